//! `shoji-probe`: the host checks a script needs before it builds anything heavy, as the shim
//! makes them. One line on stdout; exit status 0 (yes), 1 (no) or 2 (usage).
//!
//!     shoji-probe kvm               can KVM run an ordinary guest here?
//!     shoji-probe clh [BINARY]      can Cloud Hypervisor run guests here? (BINARY: default
//!                                   `cloud-hypervisor`, looked up as the shim does)
use std::{path::PathBuf, process::ExitCode};

use shoji_probe::{clh_blocker, kvm, locate};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (ok, line) = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["kvm"] => {
            let kvm = kvm::probe();
            (kvm.usable, kvm.reason.clone())
        }
        ["clh"] | ["clh", _] => {
            let binary = PathBuf::from(args.get(1).map_or("cloud-hypervisor", String::as_str));
            let found = locate(&binary);
            match clh_blocker(kvm::probe(), &binary, found.is_some()) {
                Some(why) => (false, why),
                None => (
                    true,
                    format!(
                        "KVM runs ordinary guests and cloud-hypervisor is {}",
                        found.expect("found").display()
                    ),
                ),
            }
        }
        _ => {
            eprintln!("usage: shoji-probe kvm | shoji-probe clh [BINARY]");
            return ExitCode::from(2);
        }
    };
    println!("{line}");
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
