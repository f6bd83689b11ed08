//! Encrypted suspend and resume of a real qemu VM through QMP and the saved-state object
//! (issue 13 item 4, the qemu half; the agent/TTP half is in `crates/caas`): a boot-sector
//! guest counts in a register and writes each value to qemu's debug console; its state is
//! saved encrypted, restored into ANOTHER qemu process, and the count continues exactly
//! where it stopped. A tampered or truncated saved state is refused and the guest never
//! runs.
//!
//! Needs qemu-system-x86 (`scripts/install-deps`); without it the tests fail saying so.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use caas_crypto::SecretKey;
use caas_workload::qmp::Qmp;
use caas_workload::state::{StateError, StateHeader, StateReader, StateWriter, read_header};
use caas_workload::suspend::{SuspendError, restore_vm, save_vm};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

/// A boot sector: `cli; xor ax,ax; mov ds,ax; mov dx,0xe9; xor ebx,ebx; top: inc ebx;
/// mov eax,ebx; 4 × (out dx,al; shr eax,8); mov ecx,0x400000; addr32 loop $; jmp top`:
/// the count 1, 2, 3, ... as little-endian u32s on a debug console at port 0xe9 (SeaBIOS
/// logs to 0x402), the count itself only in a register.
fn counter_sector() -> [u8; 512] {
    let code: &[u8] = &[
        0xFA, 0x31, 0xC0, 0x8E, 0xD8, 0xBA, 0xE9, 0x00, 0x66, 0x31, 0xDB, // 0x00..0x0b
        0x66, 0x43, // 0x0b inc ebx
        0x66, 0x89, 0xD8, // mov eax,ebx
        0xEE, 0x66, 0xC1, 0xE8, 0x08, // out; shr eax,8
        0xEE, 0x66, 0xC1, 0xE8, 0x08, //
        0xEE, 0x66, 0xC1, 0xE8, 0x08, //
        0xEE, // 0x1f
        0x66, 0xB9, 0x00, 0x00, 0x40, 0x00, // 0x20 mov ecx,0x400000
        0x67, 0xE2, 0xFD, // 0x26 addr32 loop 0x26
        0xEB, 0xE0, // 0x29 jmp 0x0b
    ];
    let mut s = [0u8; 512];
    s[..code.len()].copy_from_slice(code);
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

fn qemu_bin() -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
        .expect("qemu-system-x86_64 is not installed: run scripts/install-deps (Debian qemu-system-x86 with qemu-utils)")
}

struct Vm {
    child: Child,
    qmp: PathBuf,
    out: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the counter VM (the same devices every time, as a migration needs).
fn start(dir: &Path, name: &str, disk: &Path, incoming: bool) -> Vm {
    let qmp = dir.join(format!("{name}.qmp"));
    let out = dir.join(format!("{name}.out"));
    let mut c = Command::new(qemu_bin());
    c.args([
        "-accel", "tcg", "-m", "16", "-display", "none", "-monitor", "none",
    ])
    .args(["-nodefaults", "-no-reboot", "-serial", "none", "-chardev"])
    .arg(format!("file,id=dbg,path={}", out.display()))
    .args(["-device", "isa-debugcon,iobase=0xe9,chardev=dbg", "-drive"])
    .arg(format!("format=raw,if=ide,file={}", disk.display()))
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if incoming {
        c.args(["-incoming", "defer", "-S"]);
    }
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Vm { child, qmp, out }
}

fn connect(vm: &Vm) -> Qmp {
    Qmp::connect_until(&vm.qmp, Instant::now() + T, T).unwrap()
}

/// Waits until the VM wrote at least `n` counts.
fn wait_counts(vm: &Vm, n: usize) -> Vec<u8> {
    let deadline = Instant::now() + T;
    loop {
        let b = std::fs::read(&vm.out).unwrap_or_default();
        if b.len() >= 4 * n {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "the VM wrote {} bytes; qemu: {}",
            b.len(),
            std::fs::read_to_string(vm.out.with_extension("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn counts(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

struct Fixture {
    dir: tempfile::TempDir,
    disk: PathBuf,
    key: SecretKey,
    header: StateHeader,
    object: PathBuf,
    before: Vec<u8>,
}

/// Runs the counter VM, saves it encrypted to `object` and quits it.
fn suspended() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, counter_sector()).unwrap();
    let vm = start(dir.path(), "a", &disk, false);
    wait_counts(&vm, 10);
    let mut q = connect(&vm);
    let key = caas_crypto::random_key().unwrap();
    let header = StateHeader::new("vm1", &"ab".repeat(32), 1).unwrap();
    let object = dir.path().join("vm1.state");
    let f = std::fs::File::create(&object).unwrap();
    let mut w = StateWriter::new(f, &key, &header).unwrap();
    w.write_domain_state(b"{\"crypto-domain\": 1}").unwrap();
    let t = save_vm(&mut q, &mut w, T).unwrap();
    w.finish().unwrap();
    eprintln!(
        "saved {} bytes of qemu state in {} ms",
        t.stream_bytes, t.millis
    );
    assert!(t.stream_bytes > 1000);
    q.quit().unwrap();
    drop(vm);
    let before = std::fs::read(dir.path().join("a.out")).unwrap();
    Fixture {
        dir,
        disk,
        key,
        header,
        object,
        before,
    }
}

/// Restores `object` into a fresh qemu "b"; returns the VM and the result.
fn restore(fx: &Fixture, object: &[u8], name: &str) -> (Vm, Result<(), SuspendError>) {
    let vm = start(fx.dir.path(), name, &fx.disk, true);
    let mut q = connect(&vm);
    let mut r = object;
    let res = (|| {
        let (h, prefix) = read_header(&mut r)?;
        assert_eq!(h, fx.header);
        let mut s = StateReader::new(r, h, &prefix, &fx.key)?;
        let d = s.read_domain_state()?;
        assert_eq!(d.expose(), b"{\"crypto-domain\": 1}");
        restore_vm(&mut q, &mut s, T).map(drop)
    })();
    (vm, res)
}

#[test]
fn suspended_vm_resumes_in_another_qemu_where_it_stopped() {
    let fx = suspended();
    let obj = std::fs::read(&fx.object).unwrap();
    // The saved state holds no plaintext of the guest's memory (its code).
    let code = &counter_sector()[..0x2b];
    assert!(
        !obj.windows(16).any(|w| code.windows(16).any(|c| c == w)),
        "guest memory in the clear in the saved state"
    );
    let (vm, res) = restore(&fx, &obj, "b");
    res.unwrap();
    let after = wait_counts(&vm, 10);
    // Bytes of one count may straddle the suspend: the two logs together are one sequence.
    let mut all = fx.before.clone();
    all.extend_from_slice(&after);
    let c = counts(&all);
    let n_before = fx.before.len() / 4;
    assert!(c.len() >= n_before + 10);
    for (i, v) in c.iter().enumerate() {
        assert_eq!(
            *v,
            i as u32 + 1,
            "count {i} after {n_before} before the suspend: {c:?}"
        );
    }
    eprintln!(
        "counted to {} before, {} after the resume",
        n_before,
        c.len()
    );
}

/// Asserts the restore failed with `want` and the guest never ran.
fn refused(fx: &Fixture, object: &[u8], name: &str, want: fn(&StateError) -> bool) {
    let (vm, res) = restore(fx, object, name);
    match &res {
        Err(SuspendError::State(e)) if want(e) => {}
        other => panic!("{name}: {other:?}"),
    }
    drop(vm);
    std::thread::sleep(Duration::from_millis(100));
    let out = std::fs::read(fx.dir.path().join(format!("{name}.out"))).unwrap_or_default();
    assert!(out.is_empty(), "{name}: the guest ran on a refused state");
}

#[test]
fn tampered_saved_state_is_refused_and_never_runs() {
    let fx = suspended();
    let mut obj = std::fs::read(&fx.object).unwrap();
    let mid = obj.len() / 2;
    obj[mid] ^= 0x20;
    refused(&fx, &obj, "flip", |e| matches!(e, StateError::Tampered(_)));
    // The last byte (the final chunk's tag).
    let mut obj = std::fs::read(&fx.object).unwrap();
    let last = obj.len() - 1;
    obj[last] ^= 1;
    refused(&fx, &obj, "tag", |e| matches!(e, StateError::Tampered(_)));
}

#[test]
fn truncated_saved_state_is_refused_and_never_runs() {
    let fx = suspended();
    let obj = std::fs::read(&fx.object).unwrap();
    // Cut at the last chunk boundary: every chunk present authenticates, the final one is
    // missing.
    let mut r = &obj[..];
    let (_, prefix) = read_header(&mut r).unwrap();
    let mut at = prefix.len();
    let mut last_boundary = at;
    while at < obj.len() {
        last_boundary = at;
        let len = u32::from_be_bytes(obj[at..at + 4].try_into().unwrap()) as usize;
        at += 4 + len;
    }
    refused(&fx, &obj[..last_boundary], "cut", |e| {
        matches!(e, StateError::Truncated(_))
    });
    // A different key (another suspend's K_s) opens nothing.
    let mut other = std::fs::read(&fx.object).unwrap();
    other.truncate(obj.len());
    let mut s = &other[..];
    let (h, p) = read_header(&mut s).unwrap();
    let mut rd = StateReader::new(s, h, &p, &caas_crypto::random_key().unwrap()).unwrap();
    let mut b = [0u8; 8];
    let e = rd.read(&mut b).unwrap_err();
    assert!(matches!(
        caas_workload::state::unwrap_state(e),
        StateError::Tampered(0)
    ));
}
