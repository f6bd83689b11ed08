//! `docs/deploy.md` and `deploy/systemd/` cannot rot: every `caas` command the guide shows
//! names real subcommands and flags (checked against the real binary's `--help`), and the
//! systemd units pass `systemd-analyze verify` (with their `ExecStart=` pointed at the
//! built binary) and keep their hardening. The example configs are checked by the loaders
//! themselves (`crates/caas/src/deploy_files.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
use common::*;
use std::process::Command;

fn help(path: &[&str]) -> String {
    let out = Command::new(caas_bin())
        .args(path)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "caas {} --help failed: {}",
        path.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The subcommand names of a `--help` text (its `Commands:` section).
fn subcommands(help: &str) -> Vec<String> {
    let Some(i) = help.find("Commands:\n") else {
        return vec![];
    };
    help[i + 10..]
        .lines()
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Every `caas ...` command line of the guide's ```sh blocks (after `sudo -u USER`).
fn commands(doc: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut in_sh = false;
    for line in doc.lines() {
        if line.trim_start().starts_with("```") {
            in_sh = line.trim() == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let mut words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"sudo") && words.get(1) == Some(&"-u") {
            words.drain(..3);
        }
        if words.first() == Some(&"caas") {
            // Stop at a redirection or pipe: what follows is not caas's.
            let words: Vec<String> = words[1..]
                .iter()
                .take_while(|w| !matches!(**w, ">" | "|" | "&&" | ";"))
                .map(|w| w.to_string())
                .collect();
            out.push(words);
        }
    }
    out
}

#[test]
fn every_caas_command_in_the_deploy_guide_exists_with_its_flags() {
    let doc = std::fs::read_to_string(repo_root().join("docs/deploy.md")).unwrap();
    let cmds = commands(&doc);
    assert!(cmds.len() >= 20, "found only {} commands", cmds.len());
    for words in &cmds {
        let mut path: Vec<&str> = Vec::new();
        let mut text = help(&[]);
        for w in words {
            if w.starts_with('-') {
                break;
            }
            if subcommands(&text).iter().any(|s| s == w) {
                path.push(w);
                text = help(&path);
            } else {
                break;
            }
        }
        assert!(
            !path.is_empty() && subcommands(&text).is_empty(),
            "`caas {}`: does not name a complete subcommand (stopped at `caas {}`)",
            words.join(" "),
            path.join(" ")
        );
        for w in words.iter().filter(|w| w.starts_with("--")) {
            let flag = w.split('=').next().unwrap();
            let listed = text
                .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
                .any(|t| {
                    t == flag
                        || t.starts_with(&format!("{flag}="))
                        || t.starts_with(&format!("{flag}<"))
                });
            assert!(
                listed,
                "`caas {}`: `caas {}` has no flag {flag}:\n{text}",
                words.join(" "),
                path.join(" ")
            );
        }
    }
}

#[test]
fn the_systemd_units_verify_and_stay_hardened() {
    let units = repo_root().join("deploy/systemd");
    let dir = tempfile::tempdir().unwrap();
    let mut names = Vec::new();
    for e in std::fs::read_dir(&units).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".service") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        for need in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "LimitCORE=0",
            "StateDirectory=",
            "User=",
            "PrivateTmp=yes",
            "ExecStart=/usr/local/bin/caas ",
        ] {
            assert!(text.contains(need), "{name}: missing {need}");
        }
        // The command the unit runs exists with its flags.
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart=/usr/local/bin/caas "))
            .unwrap();
        let words: Vec<&str> = exec.split_whitespace().collect();
        let sub: Vec<&str> = words
            .iter()
            .take_while(|w| !w.starts_with('-'))
            .copied()
            .collect();
        let h = help(&sub);
        for f in words.iter().filter(|w| w.starts_with("--")) {
            assert!(
                h.contains(*f),
                "{name}: `caas {}` has no {f}",
                sub.join(" ")
            );
        }
        std::fs::write(
            dir.path().join(&name),
            text.replace("/usr/local/bin/caas", &caas_bin().display().to_string()),
        )
        .unwrap();
        names.push(name);
    }
    assert!(
        names.iter().any(|n| n == "caas-key-service.service")
            && names.iter().any(|n| n == "caas-host.service"),
        "{names:?}"
    );
    let host = std::fs::read_to_string(units.join("caas-host.service")).unwrap();
    assert!(host.contains("DeviceAllow=/dev/tpmrm0 rw") && host.contains("DevicePolicy=closed"));
    let ks = std::fs::read_to_string(units.join("caas-key-service.service")).unwrap();
    assert!(ks.contains("User=caas") && ks.contains("PrivateDevices=yes"));
    // The example configs write only where the units allow (ProtectSystem=strict): the
    // key service's node key and its checkpoint in its StateDirectory, the agent's state
    // and run directories in its StateDirectory and RuntimeDirectory.
    let cfg = |f: &str| std::fs::read_to_string(repo_root().join("config").join(f)).unwrap();
    assert!(ks.contains("StateDirectory=caas-key-service\n"));
    assert!(
        cfg("key-service.example.toml")
            .contains("node_key_file = \"/var/lib/caas-key-service/node.key\""),
        "the example's node key is outside the unit's StateDirectory"
    );
    assert!(
        host.contains("StateDirectory=caas-host\n")
            && host.contains("RuntimeDirectory=caas-host\n")
    );
    let agent = cfg("host-agent.example.toml");
    assert!(
        agent.contains("state_dir = \"/var/lib/caas-host\"")
            && agent.contains("run_dir = \"/run/caas-host\""),
        "the example agent's directories are not the unit's"
    );
    assert!(
        ks.contains("--config /etc/caas/key-service.toml")
            && host.contains("--config /etc/caas/host-agent.toml")
    );
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&names)
        .current_dir(dir.path())
        .output()
        .unwrap_or_else(|e| {
            panic!("systemd-analyze not runnable ({e}): install the Debian package systemd")
        });
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
