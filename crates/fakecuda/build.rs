//! The double stands in for the driver as `libcuda.so.1` (and, through a second name for the
//! same file, `libnvidia-ml.so.1`): give it that soname so programs linked against it look for it
//! under the driver's name.
//!
//! `-Bsymbolic`: the double's references to its own entries bind inside it, as in the real
//! driver, so the entry pointers its `cuGetProcAddress` hands out are its own even when the
//! limiter, preloaded, exports the same names. Without it the dynamic linker would resolve them
//! to the limiter's hooks and a `cuGetProcAddress` route would pass whether or not the limiter's
//! version table knows the symbol.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so.1");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-Bsymbolic");
}
