//! `vigo-perf demo`: the README's main job until the fleet demo exists.
//! Generates a multi-GB incompressible image, ingests it into a store on the
//! embedded default with the real `envoy` binary, verifies every chunk and
//! the whole-content BLAKE3, exports it and checks the copy, printing each
//! step. Exits non-zero if any step fails or any hash disagrees.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::harness::{self, WorkDir};
use crate::ingest::generate_file;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Size of the generated image (binary: 2G = 2 GiB).
    #[arg(long, default_value = "2G", value_parser = harness::size_arg)]
    size: u64,
    /// Base directory (a real disk, not tmpfs) for the image and the store.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// The envoy binary (default: next to vigo-perf, or $VIGO_ENVOY).
    #[arg(long)]
    envoy: Option<PathBuf>,
}

/// Seed of the demo image: any fixed value makes runs comparable.
const DEMO_SEED: u64 = 0x5649_474f;

pub fn run(args: DemoArgs) -> Result<()> {
    let envoy = harness::locate_envoy(args.envoy.as_deref())?;
    let work = WorkDir::create(&args.dir, "demo", true)?;
    let store = work.path().join("store");
    let image_path = work.path().join("image.bin");
    let free = work.available_bytes()?;
    if free < args.size.saturating_mul(3) {
        bail!(
            "{} has {} free; the demo needs 3x the image size ({}) for the image, the store and the export",
            args.dir.display(),
            harness::size_label(free),
            harness::size_label(args.size.saturating_mul(3))
        );
    }

    let step = |what: &str| eprintln!("\n== {what}");
    step(&format!(
        "generating a {} incompressible image",
        harness::size_label(args.size)
    ));
    let t = Instant::now();
    let image = generate_file(&image_path, args.size, DEMO_SEED)?;
    eprintln!(
        "{} written in {:.1} s, BLAKE3 {}",
        image.path.display(),
        t.elapsed().as_secs_f64(),
        image.content_blake3
    );

    let envoy_cmd = |args: &[&str]| {
        let mut c = Command::new(&envoy);
        c.arg("--store").arg(&store).args(args);
        c
    };
    let run = |mut c: Command, what: &str| -> Result<(String, f64)> {
        let t = Instant::now();
        let out = c
            .output()
            .with_context(|| format!("cannot run envoy {what}"))?;
        let secs = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!(
                "envoy {what} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), secs))
    };
    let rate = |secs: f64| args.size as f64 / secs / 1e9;

    step(&format!("envoy store add (store {})", store.display()));
    let (out, secs) = run(
        envoy_cmd(&[
            "--json",
            "store",
            "add",
            image_path.to_str().context("non-UTF-8 path")?,
        ]),
        "store add",
    )?;
    let added: serde_json::Value =
        serde_json::from_str(out.trim()).context("envoy store add --json printed no JSON")?;
    let id = added["id"]
        .as_str()
        .context("no id in envoy's output")?
        .to_string();
    eprintln!(
        "blob {id}\n{} chunks, io backend {}, {:.2} s ({:.2} GB/s, durable)",
        added["chunks"],
        added["io_backend"],
        secs,
        rate(secs)
    );
    if added["content_blake3"].as_str() != Some(image.content_blake3.as_str()) {
        bail!(
            "content BLAKE3 mismatch: envoy says {}, the image is {}",
            added["content_blake3"],
            image.content_blake3
        );
    }
    eprintln!(
        "content BLAKE3 matches the generator's: {}",
        image.content_blake3
    );

    step("envoy store verify --full (every chunk, then the whole-content BLAKE3)");
    let (out, secs) = run(
        envoy_cmd(&["store", "verify", "--full", &id]),
        "store verify",
    )?;
    eprint!("{out}");
    eprintln!("{:.2} s ({:.2} GB/s)", secs, rate(secs));

    step("envoy store export (verified copy) and an independent check of the copy");
    let copy = work.path().join("exported.bin");
    let (_, secs) = run(
        envoy_cmd(&[
            "store",
            "export",
            &id,
            copy.to_str().context("non-UTF-8 path")?,
        ]),
        "store export",
    )?;
    eprintln!(
        "{} in {:.2} s ({:.2} GB/s)",
        copy.display(),
        secs,
        rate(secs)
    );
    let copy_hash = {
        let mut h = blake3::Hasher::new();
        h.update_mmap_rayon(&copy)
            .with_context(|| format!("cannot read {}", copy.display()))?;
        h.finalize().to_hex().to_string()
    };
    if copy_hash != image.content_blake3 {
        bail!(
            "exported copy hashes to {copy_hash}, the image to {}",
            image.content_blake3
        );
    }
    eprintln!("exported copy is byte-for-byte the image (BLAKE3 {copy_hash})");

    step("envoy store ls");
    let (out, _) = run(envoy_cmd(&["store", "ls"]), "store ls")?;
    eprint!("{out}");
    eprintln!("\ndemo complete; removing {}", work.path().display());
    Ok(())
}
