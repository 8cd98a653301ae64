//! Installing what the selected targets need, idempotently: each
//! requirement is probed first and only missing ones are installed (one
//! `apt-get update` + `apt-get install` for all of them, one `rustup target
//! add`). Whatever stays missing is reported per target, so that target's
//! row says why it was not built instead of failing obscurely.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use crate::targets::{self, Probe, Target};

/// What could not be set up, per target triple.
pub type Missing = BTreeMap<&'static str, Vec<String>>;

/// Installs what `selected` lacks; returns what is still missing afterwards.
/// Progress goes to stderr.
pub fn ensure(selected: &[&'static Target]) -> Missing {
    let mut missing = Missing::new();

    let mut packages = BTreeSet::new();
    for t in selected {
        for r in t.needs.iter().filter(|r| !targets::present(r.probe)) {
            packages.insert(r.apt);
        }
    }
    if !packages.is_empty() {
        let list: Vec<&str> = packages.iter().copied().collect();
        eprintln!("hw-targets: installing {}", list.join(" "));
        if let Err(e) = apt_install(&list) {
            eprintln!("hw-targets: {e}");
        }
    }
    for t in selected {
        for r in t.needs.iter().filter(|r| !targets::present(r.probe)) {
            let what = match r.probe {
                Probe::Command(c) => format!("command `{c}`"),
                Probe::File(f) => format!("file {f}"),
            };
            missing
                .entry(t.triple)
                .or_default()
                .push(format!("{what} (Debian package {})", r.apt));
        }
    }

    match installed_rust_targets() {
        Ok(installed) => {
            let wanted: Vec<&str> = selected
                .iter()
                .map(|t| t.triple)
                .filter(|t| !installed.contains(*t))
                .collect();
            if !wanted.is_empty() {
                eprintln!("hw-targets: rustup target add {}", wanted.join(" "));
                let ok = Command::new("rustup")
                    .args(["target", "add"])
                    .args(&wanted)
                    .status()
                    .is_ok_and(|s| s.success());
                let now = installed_rust_targets().unwrap_or_default();
                for t in wanted.iter().filter(|t| !now.contains(**t)) {
                    let why = if ok {
                        "not listed after install"
                    } else {
                        "failed"
                    };
                    missing
                        .entry(targets::find(t).expect("selected").triple)
                        .or_default()
                        .push(format!("rust-std for {t} (`rustup target add {t}` {why})"));
                }
            }
        }
        // Without rustup (a distribution's Rust) the build says what lacks.
        Err(e) => eprintln!("hw-targets: cannot list rustup targets ({e}); not installing any"),
    }
    missing
}

fn apt_install(packages: &[&str]) -> Result<(), String> {
    if !targets::present(Probe::Command("apt-get")) {
        return Err("no apt-get here: install the packages above by hand".into());
    }
    // apt needs root; say so rather than let it fail noisily.
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if uid != "0" {
        return Err(format!(
            "not root: run `apt-get install {}` as root",
            packages.join(" ")
        ));
    }
    let run = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|e| format!("apt-get: {e}"))
            .and_then(|s| {
                if s.success() {
                    Ok(())
                } else {
                    Err(format!("apt-get {} exited {s}", args[0]))
                }
            })
    };
    run(&["update", "-q"])?;
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend_from_slice(packages);
    run(&install)
}

fn installed_rust_targets() -> Result<BTreeSet<String>, String> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}
