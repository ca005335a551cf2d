//! Link flags for the VMOD.
fn main() {
    // Keep the library mapped after dlclose: Varnish unloads a VMOD when its last VCL is
    // discarded, and our exporter thread or a thread-local destructor may still point into it
    // (research/perf-and-sdk.md §B4). With nodelete, unloading never pulls code from under them.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    println!("cargo:rerun-if-changed=build.rs");
}
