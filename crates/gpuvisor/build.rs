//! Embeds the web console (`web/dist`, built by `npm ci && npm run build` in `web/`) into the
//! binary: every file, and a gzip of each, as static bytes with its content type
//! (`$OUT_DIR/console_assets.rs`, read by `src/console.rs`). Without a build the binary serves
//! a page saying how to make one; under `CI=true` a missing build is an error instead.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Why the build script stopped: what it was doing, and the cause.
#[derive(Debug)]
struct BuildError(String);

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BuildError {}

type Result<T> = std::result::Result<T, BuildError>;

/// `what` failed on `path`: the error says both.
fn io<T>(r: std::io::Result<T>, what: &str, path: &Path) -> Result<T> {
    r.map_err(|e| BuildError(format!("{what} {}: {e}", path.display())))
}

fn env_path(name: &str) -> Result<PathBuf> {
    std::env::var_os(name).map(PathBuf::from).ok_or_else(|| {
        BuildError(format!(
            "{name} is not set (cargo sets it for build scripts)"
        ))
    })
}

fn main() -> Result<()> {
    let web = env_path("CARGO_MANIFEST_DIR")?.join("../../web");
    let dist = web.join("dist");
    let out = env_path("OUT_DIR")?;
    println!("cargo:rerun-if-env-changed=CI");
    let mut files = Vec::new();
    if dist.join("index.html").is_file() {
        println!("cargo:rerun-if-changed={}", dist.display());
        walk(&dist, &mut files)?;
    } else {
        // Watch for the build to appear (web/ itself: dist/ is made inside it).
        println!(
            "cargo:rerun-if-changed={}",
            web.join("package.json").display()
        );
        println!("cargo:rerun-if-changed={}", web.display());
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            return Err(BuildError(format!(
                "the web console is not built ({} has no index.html): run `npm ci && npm run \
                 build` in web/ before cargo build",
                dist.display()
            )));
        }
    }
    files.sort();
    let mut table = String::from("&[\n");
    for f in &files {
        let rel = f
            .strip_prefix(&dist)
            .map_err(|_| BuildError(format!("{} is not under {}", f.display(), dist.display())))?;
        // Served: `/` (index.html) and `/assets/*` only. Another top-level file would need a
        // route of its own beside the API's (see src/console.rs).
        if rel != Path::new("index.html") && !rel.starts_with("assets") {
            return Err(BuildError(format!(
                "web/dist/{} is neither index.html nor under assets/: the daemon serves only those",
                rel.display()
            )));
        }
        let url = format!(
            "/{}",
            rel.components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/")
        );
        let raw = io(std::fs::read(f), "read", f)?;
        let gz_path = out.join(format!("console{}.gz", url.replace('/', "_")));
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        io(enc.write_all(&raw), "gzip", f)?;
        let gz = io(enc.finish(), "gzip", f)?;
        io(std::fs::write(&gz_path, gz), "write", &gz_path)?;
        table.push_str(&format!(
            "    Asset {{ path: {url:?}, mime: {:?}, raw: include_bytes!({:?}), gz: include_bytes!({:?}) }},\n",
            mime(f),
            f.display().to_string(),
            gz_path.display().to_string(),
        ));
    }
    table.push_str("]\n");
    let at = out.join("console_assets.rs");
    io(std::fs::write(&at, table), "write", &at)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    for e in io(std::fs::read_dir(dir), "read", dir)? {
        let p = io(e, "read", dir)?.path();
        if p.is_dir() {
            walk(&p, files)?;
        } else if p.is_file() {
            files.push(p);
        }
    }
    Ok(())
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
