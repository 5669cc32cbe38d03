//! Stands in for `cloud-hypervisor` in the driver tests: see `shoji_tests::fake_clh`.
fn main() {
    std::process::exit(shoji_tests::fake_clh::main());
}
