//! Link flags for the VMOD, and the version of the Varnish it is built against.
fn main() {
    // Keep the library mapped after dlclose: Varnish unloads a VMOD when its last VCL is
    // discarded, and our exporter thread or a thread-local destructor may still point into it
    // (research/perf-and-sdk.md §B4). With nodelete, unloading never pulls code from under them.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    // A VMOD only loads into the Varnish it was built for (the VRT ABI is checked at load), so
    // the build-time version is the running one: reported in the span resource.
    let version = std::process::Command::new("pkg-config")
        .args(["--modversion", "varnishapi"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=VARNISH_API_VERSION={version}");
}
