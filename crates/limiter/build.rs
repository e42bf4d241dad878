//! Turns `exports.txt` into (1) `--defsym=N=gvh_N` aliases and a version script for the cdylib
//! link only (`rustc-cdylib-link-arg`), so the rlib linked into the daemon defines no `dlsym` or
//! `cu*` symbol that could capture the daemon's own calls, and (2) `hooks_gen.rs`: the name →
//! index table and the index → hook function table used by the `dlsym` and `cuGetProcAddress`
//! hooks. One list, so an exported name without a hook function fails to compile.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let list = manifest.join("exports.txt");
    println!("cargo:rerun-if-changed={}", list.display());
    let text = match std::fs::read_to_string(&list) {
        Ok(t) => t,
        Err(e) => panic!("reading {}: {e}", list.display()),
    };
    let names: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();

    let mut map = String::from("{\n  global:\n");
    for n in &names {
        let _ = writeln!(map, "    {n};");
    }
    map.push_str("  local: *;\n};\n");
    let map_path = out.join("exports.map");
    if let Err(e) = std::fs::write(&map_path, map) {
        panic!("writing {}: {e}", map_path.display());
    }
    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,--version-script={}",
        map_path.display()
    );
    for n in &names {
        println!("cargo:rustc-cdylib-link-arg=-Wl,--defsym={n}=gvh_{n}");
    }

    let mut gen = String::new();
    let _ = writeln!(gen, "pub(crate) const N_HOOKS: usize = {};", names.len());
    let _ = writeln!(
        gen,
        "pub(crate) static HOOK_NAMES: [&::std::ffi::CStr; N_HOOKS] = ["
    );
    for n in &names {
        let _ = writeln!(gen, "    c\"{n}\",");
    }
    gen.push_str("];\n#[allow(non_upper_case_globals, dead_code)]\npub(crate) mod idx {\n");
    for (i, n) in names.iter().enumerate() {
        let _ = writeln!(gen, "    pub(crate) const {n}: usize = {i};");
    }
    gen.push_str("}\npub(crate) fn hook_index(name: &[u8]) -> Option<usize> {\n    match name {\n");
    for (i, n) in names.iter().enumerate() {
        let _ = writeln!(gen, "        b\"{n}\" => Some({i}),");
    }
    gen.push_str("        _ => None,\n    }\n}\n");
    gen.push_str("pub(crate) fn hook_ptr(i: usize) -> *mut ::std::ffi::c_void {\n    match i {\n");
    for (i, n) in names.iter().enumerate() {
        let _ = writeln!(gen, "        {i} => gvh_{n} as *mut ::std::ffi::c_void,");
    }
    gen.push_str("        _ => ::std::ptr::null_mut(),\n    }\n}\n");
    let gen_path = out.join("hooks_gen.rs");
    if let Err(e) = std::fs::write(&gen_path, gen) {
        panic!("writing {}: {e}", gen_path.display());
    }
}
