//! Golden chunking vectors: input → boundaries and chunk hashes, committed in
//! `tests/golden/chunker.txt`. A change in the chunker (parameters, masks,
//! the fastcdc crate's cut function) changes every blob id, so it must never
//! happen silently. Regenerate deliberately with `VIGO_BLESS=1`.

use engine::chunker::{Chunker, ChunkerParams};
use engine::hash::ChunkHash;

/// Deterministic inputs: random bytes, a run of zeros (max-size cuts),
/// repetitive text, and a tail shorter than the minimum chunk.
fn input() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut data: Vec<u8> = (0..1_200_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    data.extend(std::iter::repeat_n(0u8, 300_000));
    for i in 0..20_000 {
        data.extend_from_slice(format!("line {i}: the quick brown fox\n").as_bytes());
    }
    data.extend_from_slice(b"tail");
    data
}

fn render(params: ChunkerParams, data: &[u8]) -> String {
    let chunker = Chunker::new(params).unwrap();
    let mut out = format!(
        "# params min {} avg {} max {}\n",
        params.min_bytes, params.avg_bytes, params.max_bytes
    );
    let mut offset = 0usize;
    for len in chunker.cuts(data) {
        let hash = ChunkHash::of(&data[offset..offset + len]);
        out.push_str(&format!("{offset} {len} {hash}\n"));
        offset += len;
    }
    out
}

#[test]
fn golden_vectors() {
    let data = input();
    let mut actual = format!("# input blake3 {}\n", blake3::hash(&data).to_hex());
    actual.push_str(&render(ChunkerParams::DEFAULT, &data));
    actual.push_str(&render(ChunkerParams::with_avg(4096).unwrap(), &data));
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/chunker.txt");
    if std::env::var_os("VIGO_BLESS").is_some() {
        std::fs::write(&path, &actual).unwrap();
        eprintln!("blessed {}", path.display());
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}); run with VIGO_BLESS=1 once",
            path.display()
        )
    });
    if actual != expected {
        let first = actual
            .lines()
            .zip(expected.lines())
            .position(|(a, e)| a != e)
            .unwrap_or(0);
        panic!(
            "chunker output changed at line {}:\n  expected: {}\n  actual:   {}\n\
             every blob id would change; bump the manifest format instead",
            first + 1,
            expected.lines().nth(first).unwrap_or("<end>"),
            actual.lines().nth(first).unwrap_or("<end>")
        );
    }
}
