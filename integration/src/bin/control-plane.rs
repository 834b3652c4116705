//! Runs a command against a throwaway Kubernetes control plane on loopback
//! (`thaw_integration::control_plane`): etcd, kube-apiserver and kube-scheduler built by
//! scripts/install-test-deps.sh.
//!
//!   control-plane -- bash deploy/check.sh
//!
//! The command runs with `KUBECONFIG` set to the admin's kubeconfig, the Go-built kubectl
//! first on `PATH`, and `THAW_CHECK_CLUSTER=ephemeral` (the cluster is gone afterwards, so a
//! check may create what its dry run needs). The control plane is stopped and removed when
//! the command ends (kept, with its logs, when it fails); the exit status is the command's.

use std::process::{Command, ExitCode};

use thaw_integration::control_plane::{tool, ControlPlane};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match args.iter().position(|a| a == "--") {
        Some(i) if i + 1 < args.len() => &args[i + 1..],
        _ => {
            eprintln!("usage: control-plane -- COMMAND [ARGS...]");
            return ExitCode::from(2);
        }
    };
    // No extender runs: kube-scheduler's calls to it fail and are ignored (ignorable: true).
    let mut plane = ControlPlane::start("http://127.0.0.1:1");
    let kubectl = tool("kubectl");
    let kubectl_dir = kubectl.parent().expect("kubectl has a directory");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path =
        std::env::join_paths(std::iter::once(kubectl_dir.to_path_buf()).chain(std::env::split_paths(&path)))
            .expect("PATH");
    let status = Command::new(&command[0])
        .args(&command[1..])
        .env("KUBECONFIG", plane.admin_kubeconfig())
        .env("PATH", path)
        .env("THAW_CHECK_CLUSTER", "ephemeral")
        .status();
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            plane.keep_on_failure();
            eprintln!("control-plane: {} exited with {s}", command[0]);
            ExitCode::from(u8::try_from(s.code().unwrap_or(1)).unwrap_or(1).max(1))
        }
        Err(e) => {
            eprintln!("control-plane: cannot run {}: {e}", command[0]);
            ExitCode::from(127)
        }
    }
}
