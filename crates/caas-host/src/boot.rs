//! The dev hosts' measured "boot": measures the host's boot components (firmware,
//! bootloader, kernel, hypervisor, host-agent binary and config — files in the host's
//! directory) into PCRs 0–7 of the sha256 bank, the way platform firmware and a boot loader
//! would, and writes the matching TCG PC Client crypto-agile binary event log.

use crate::error::Error;
use caas_attest::eventlog::{EV_IPL, EV_PLATFORM_CONFIG_FLAGS, EV_POST_CODE, EV_SEPARATOR};
use caas_attest::{EventLogWriter, HashAlg};
use caas_tpm::{PcrBank, Tpm};
use std::path::{Path, PathBuf};

/// One measured component.
#[derive(Debug, Clone)]
pub struct BootComponent {
    /// PCR it is measured into.
    pub pcr: u32,
    /// EV_* event type.
    pub event_type: u32,
    /// File whose content is measured.
    pub path: PathBuf,
    /// Event data (a description, as a boot loader would log a path).
    pub description: String,
}

/// The dev layout: firmware → PCR 0, platform config → PCR 1, bootloader, kernel and
/// hypervisor → PCR 4, host-agent config → PCR 5, host-agent binary → PCR 6, then an
/// EV_SEPARATOR in each of PCRs 0–7.
pub fn dev_components(
    boot_dir: &Path,
    agent_binary: &Path,
    agent_config: &Path,
) -> Vec<BootComponent> {
    let c = |pcr, event_type, path: PathBuf, d: &str| BootComponent {
        pcr,
        event_type,
        path,
        description: d.to_string(),
    };
    vec![
        c(0, EV_POST_CODE, boot_dir.join("firmware.bin"), "firmware"),
        c(
            1,
            EV_PLATFORM_CONFIG_FLAGS,
            boot_dir.join("platform-config"),
            "platform-config",
        ),
        c(4, EV_IPL, boot_dir.join("bootloader.efi"), "bootloader.efi"),
        c(4, EV_IPL, boot_dir.join("vmlinuz"), "vmlinuz"),
        c(4, EV_IPL, boot_dir.join("hypervisor.bin"), "hypervisor.bin"),
        c(5, EV_IPL, agent_config.to_path_buf(), "host-agent-config"),
        c(6, EV_IPL, agent_binary.to_path_buf(), "host-agent-binary"),
    ]
}

/// Writes the dev boot component files (firmware, platform config, bootloader, kernel,
/// hypervisor) into `boot_dir` if missing.
pub fn write_dev_boot_files(boot_dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(boot_dir)
        .map_err(Error::io(format!("create {}", boot_dir.display())))?;
    for (name, content) in [
        ("firmware.bin", "caas dev firmware 1.0\n"),
        ("platform-config", "secure-boot=on\nvt-d=on\n"),
        ("bootloader.efi", "caas dev bootloader 1.0\n"),
        ("vmlinuz", "caas dev kernel 6.1\n"),
        ("hypervisor.bin", "caas dev hypervisor 1.0\n"),
    ] {
        let p = boot_dir.join(name);
        if !p.exists() {
            std::fs::write(&p, content.repeat(64))
                .map_err(Error::io(format!("write {}", p.display())))?;
        }
    }
    Ok(())
}

/// Measures `components` into the TPM, writes the event log to `log_path`, returns it.
pub fn measured_boot(
    tpm: &mut Tpm,
    components: &[BootComponent],
    log_path: &Path,
) -> Result<Vec<u8>, Error> {
    let mut w = EventLogWriter::new(&[HashAlg::Sha256]);
    for c in components {
        let content = std::fs::read(&c.path).map_err(Error::io(format!(
            "read boot component {}",
            c.path.display()
        )))?;
        let digests = w.measure(c.pcr, c.event_type, &content, c.description.as_bytes());
        for (_, d) in digests {
            tpm.pcr_extend(PcrBank::Sha256, c.pcr, &d)?;
        }
    }
    for pcr in 0..8 {
        for (_, d) in w.measure(pcr, EV_SEPARATOR, &[0, 0, 0, 0], &[0, 0, 0, 0]) {
            tpm.pcr_extend(PcrBank::Sha256, pcr, &d)?;
        }
    }
    let log = w.into_bytes();
    std::fs::write(log_path, &log).map_err(Error::io(format!("write {}", log_path.display())))?;
    Ok(log)
}
