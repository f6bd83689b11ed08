//! The guest's sequence writer on its data disk (`caas-guest workload seq --disk /dev/vdb`,
//! started by the guest image's init when the VM has a DBSP volume): every interval it writes
//! the next record of an increasing sequence to the disk and makes it durable (fdatasync:
//! qemu forwards it as an NBD flush to the crypto domain's Secure Device Proxy); at start it
//! continues after the last record on the disk. The tests read the volume back through the
//! crypto domain and check with [`check`] that the sequence has no gap, no repeat and no fork
//! across a suspend/resume or a live migration (`docs/suspend-migrate.md`).
//!
//! Record `n` lives in block `n mod blocks` (4 KiB blocks): `"caasSEQ1"` ‖ n (u64 LE) ‖
//! prev (u64 LE, the previous record's sum) ‖ sum (u64 LE, FNV-1a over the 24 bytes before
//! it); the rest of the block is zero. The chain of sums makes a fork visible: a writer that
//! restarted from an older state rewrites a record with another predecessor.
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::time::Duration;

/// Block size of the records.
pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"caasSEQ1";

/// One record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Sequence number (from 1).
    pub seq: u64,
    /// The previous record's sum (0 for the first).
    pub prev: u64,
    /// This record's sum.
    pub sum: u64,
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Record {
    /// Record `seq` after a record whose sum is `prev`.
    pub fn new(seq: u64, prev: u64) -> Self {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&seq.to_le_bytes());
        b[16..24].copy_from_slice(&prev.to_le_bytes());
        Self {
            seq,
            prev,
            sum: fnv(&b),
        }
    }

    /// The block image.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        b[..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.prev.to_le_bytes());
        b[24..32].copy_from_slice(&self.sum.to_le_bytes());
        b
    }

    /// A valid record in `block` (magic and sum), if any.
    pub fn decode(block: &[u8]) -> Option<Self> {
        if block.len() < 32 || &block[..8] != MAGIC {
            return None;
        }
        let u = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&block[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let r = Self::new(u(8), u(16));
        (r.sum == u(24) && r.seq > 0).then_some(r)
    }
}

/// The valid records of `region` (whole blocks), each in the block its number names.
pub fn records(region: &[u8]) -> Vec<Record> {
    let blocks = (region.len() / BLOCK) as u64;
    let mut out: Vec<Record> = region
        .chunks_exact(BLOCK)
        .enumerate()
        .filter_map(|(i, b)| Record::decode(b).filter(|r| r.seq % blocks == i as u64))
        .collect();
    out.sort_by_key(|r| r.seq);
    out
}

/// Checks that the records of `region` form one unbroken chain (no gap, no repeat, no
/// fork) and returns (first, last) sequence numbers.
pub fn check(region: &[u8]) -> Result<(u64, u64), String> {
    let rs = records(region);
    let (Some(first), Some(last)) = (rs.first(), rs.last()) else {
        return Err("no record on the disk".into());
    };
    for w in rs.windows(2) {
        if w[1].seq != w[0].seq + 1 {
            return Err(format!("gap or repeat: {} then {}", w[0].seq, w[1].seq));
        }
        if w[1].prev != w[0].sum {
            return Err(format!(
                "record {} does not follow record {} (a fork)",
                w[1].seq, w[0].seq
            ));
        }
    }
    Ok((first.seq, last.seq))
}

/// Writes the sequence to `disk` (the first `blocks` blocks) forever, one record every
/// `interval`, each made durable before the next; continues after the last record found.
pub fn run(disk: &Path, blocks: u64, interval: Duration) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)?;
    let size = f
        .metadata()?
        .len()
        .max(std::io::Seek::seek(&mut &f, std::io::SeekFrom::End(0))?);
    let blocks = blocks.min(size / BLOCK as u64).max(1);
    let mut region = vec![0u8; blocks as usize * BLOCK];
    f.read_exact_at(&mut region, 0)?;
    let last = records(&region).last().copied();
    drop(region);
    let (mut seq, mut prev) = last.map_or((1, 0), |r| (r.seq + 1, r.sum));
    println!("caas-seq start {seq}");
    loop {
        let r = Record::new(seq, prev);
        f.write_all_at(&r.encode(), (seq % blocks) * BLOCK as u64)?;
        f.sync_data()?;
        if seq % 10 == 0 {
            println!("caas-seq {seq}");
        }
        prev = r.sum;
        seq += 1;
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(blocks: usize, seqs: impl IntoIterator<Item = (u64, u64)>) -> Vec<u8> {
        let mut b = vec![0u8; blocks * BLOCK];
        for (seq, prev) in seqs {
            let i = (seq % blocks as u64) as usize * BLOCK;
            b[i..i + BLOCK].copy_from_slice(&Record::new(seq, prev).encode());
        }
        b
    }

    fn chain(from: u64, to: u64) -> Vec<(u64, u64)> {
        let mut prev = if from == 1 { 0 } else { 7 };
        (from..=to)
            .map(|s| {
                let p = prev;
                prev = Record::new(s, p).sum;
                (s, p)
            })
            .collect()
    }

    #[test]
    fn an_unbroken_sequence_checks() {
        assert_eq!(check(&region(64, chain(1, 40))), Ok((1, 40)));
    }

    #[test]
    fn a_gap_a_fork_and_a_torn_record_are_found() {
        let mut c = chain(1, 40);
        c.remove(20);
        assert!(check(&region(64, c)).unwrap_err().contains("gap"));
        let mut c = chain(1, 40);
        c[30].1 ^= 1; // record 31 rewritten after another predecessor
        assert!(check(&region(64, c)).unwrap_err().contains("fork"));
        let mut b = region(64, chain(1, 40));
        b[10 * BLOCK + 9] ^= 1; // record 10 corrupted: dropped, so a gap
        assert!(check(&b).is_err());
        assert!(check(&vec![0u8; 4 * BLOCK]).is_err());
    }

    #[test]
    fn the_writer_continues_after_the_last_record() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("disk");
        std::fs::write(&p, region(32, chain(1, 5))).unwrap_or_else(|e| panic!("{e}"));
        let p2 = p.clone();
        std::thread::spawn(move || run(&p2, 32, Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(200));
        let b = std::fs::read(&p).unwrap_or_else(|e| panic!("{e}"));
        let (first, last) = check(&b).unwrap_or_else(|e| panic!("{e}"));
        assert!(last > 5, "{first}..{last}");
    }
}
