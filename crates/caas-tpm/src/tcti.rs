//! TCTI configuration strings: `device:/dev/tpmrm0` for a kernel resource manager and
//! `swtpm:host=127.0.0.1,port=2321` (or `swtpm:path=SOCK`) for the software TPM.

use crate::error::Error;
use std::str::FromStr;
use tss_esapi::tcti_ldr::TctiNameConf;

/// Parses and validates a TCTI string.
pub fn parse_tcti(s: &str) -> Result<TctiNameConf, Error> {
    let bad = |reason: &str| Error::Tcti {
        tcti: s.to_string(),
        reason: reason.to_string(),
    };
    if !(s.starts_with("device:") || s.starts_with("swtpm:") || s.starts_with("tabrmd")) {
        return Err(bad("expected device:PATH or swtpm:host=H,port=P"));
    }
    TctiNameConf::from_str(s).map_err(|e| bad(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcti_strings() {
        assert!(parse_tcti("device:/dev/tpmrm0").is_ok());
        assert!(parse_tcti("swtpm:host=127.0.0.1,port=2321").is_ok());
        assert!(parse_tcti("mssim:host=x").is_err());
        assert!(parse_tcti("").is_err());
        assert!(parse_tcti("swtpm:port=notanumber").is_err());
    }
}
