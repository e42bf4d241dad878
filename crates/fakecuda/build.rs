//! The double stands in for the driver as `libcuda.so.1` (and, through a second name for the
//! same file, `libnvidia-ml.so.1`): give it that soname so programs linked against it look for it
//! under the driver's name.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so.1");
}
