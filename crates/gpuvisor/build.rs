//! Embeds the web console (`web/dist`, built by `npm ci && npm run build` in `web/`) into the
//! binary: every file, and a gzip of each, as static bytes with its content type
//! (`$OUT_DIR/console_assets.rs`, read by `src/console.rs`). Without a build the binary serves
//! a page saying how to make one; under `CI=true` a missing build is an error instead.

// A build script that cannot read or write its files can only stop the build, with the reason.
#![allow(clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let web = manifest.join("../../web");
    let dist = web.join("dist");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    println!("cargo:rerun-if-env-changed=CI");
    let mut files = Vec::new();
    if dist.join("index.html").is_file() {
        println!("cargo:rerun-if-changed={}", dist.display());
        walk(&dist, &mut files);
    } else {
        // Watch for the build to appear (web/ itself: dist/ is made inside it).
        println!(
            "cargo:rerun-if-changed={}",
            web.join("package.json").display()
        );
        println!("cargo:rerun-if-changed={}", web.display());
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!(
                "the web console is not built ({} has no index.html): run `npm ci && npm run \
                 build` in web/ before cargo build",
                dist.display()
            );
        }
    }
    files.sort();
    // Served: `/` (index.html) and `/assets/*` only. Another top-level file would need a
    // route of its own beside the API's (see src/console.rs).
    for f in &files {
        let rel = f.strip_prefix(&dist).expect("walked under dist");
        assert!(
            rel == Path::new("index.html") || rel.starts_with("assets"),
            "web/dist/{} is neither index.html nor under assets/: the daemon serves only those",
            rel.display()
        );
    }
    let mut table = String::from("&[\n");
    for f in &files {
        let rel = f.strip_prefix(&dist).expect("walked under dist");
        let url = format!(
            "/{}",
            rel.components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/")
        );
        let raw = std::fs::read(f).expect("read a console file");
        let gz_path = out.join(format!("console{}.gz", url.replace('/', "_")));
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&raw).expect("gzip in memory");
        std::fs::write(&gz_path, enc.finish().expect("gzip in memory"))
            .expect("write the gzip of a console file");
        table.push_str(&format!(
            "    Asset {{ path: {url:?}, mime: {:?}, raw: include_bytes!({:?}), gz: include_bytes!({:?}) }},\n",
            mime(f),
            f.display().to_string(),
            gz_path.display().to_string(),
        ));
    }
    table.push_str("]\n");
    std::fs::write(out.join("console_assets.rs"), table).expect("write the console table");
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read web/dist") {
        let p = e.expect("read web/dist").path();
        if p.is_dir() {
            walk(&p, files);
        } else if p.is_file() {
            files.push(p);
        }
    }
}

fn mime(p: &Path) -> &'static str {
    match p.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "woff" => "font/woff",
        "ttf" => "font/ttf",
        "wasm" => "application/wasm",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}
