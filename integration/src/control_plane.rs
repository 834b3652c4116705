//! A real Kubernetes control plane on loopback for tests and benches: etcd, kube-apiserver and
//! kube-scheduler, built from their Go modules by `scripts/install-test-deps.sh` into
//! `~/.cache/thaw-tools/` (never downloaded as binaries), and kubectl from the same release.
//!
//! - etcd: one member, its data in the harness directory.
//! - kube-apiserver: a serving certificate from a CA generated here (openssl), service-account
//!   signing keys generated here, static tokens for the admin (`system:masters`) and for
//!   kube-scheduler (`system:kube-scheduler`, bound by the bootstrap RBAC policy), authorization
//!   `Node,RBAC`, the ServiceAccount admission plugin off (no controller-manager creates the
//!   namespaces' `default` service accounts).
//! - kube-scheduler: `deploy/scheduler/scheduler-config.yaml`, the very file operators
//!   install, with only the extender URL and the kubeconfig path substituted.
//!
//! Every process runs under a small `sh` wrapper that holds the read end of a pipe from this
//! process: when the test process ends, however it ends, the pipe closes and the wrapper
//! kills its process; the harness directory is removed the same way. A test that fails keeps
//! it (see [`ControlPlane::run`]), with every process's log, and says where.
//!
//! This module uses only `std`, `tempfile` and `serde_json`, so other packages' tests include
//! it with `#[path]` (extender/tests/e2e.rs) without depending on this crate.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The Kubernetes release the harness runs (`integration/k8s/go.mod`, the install script).
pub const KUBERNETES_VERSION: &str = "v1.34.4";
/// The etcd release (`integration/etcd/go.mod`, the install script).
pub const ETCD_VERSION: &str = "v3.6.16";

/// The admin's bearer token (`system:masters`); loopback only, gone with the harness.
const ADMIN_TOKEN: &str = "thaw-test-admin-token";
const SCHEDULER_TOKEN: &str = "thaw-test-scheduler-token";
/// What deploy/scheduler/scheduler-config.yaml says, replaced by the harness's values.
const DEPLOY_EXTENDER_URL: &str = "http://thaw-extender.thaw-system.svc:8888";
const DEPLOY_SCHEDULER_KUBECONFIG: &str = "/etc/kubernetes/scheduler.conf";
/// How long each component may take to become ready on a loaded 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs a command until a line arrives on stdin or stdin closes, then kills it (and, for the
/// directory guard, removes the directory unless the line was `keep`).
const PROCESS_WRAPPER: &str = r#"
log=$1; shift
"$@" >>"$log" 2>&1 </dev/null &
p=$!
echo "$p" >"$log.pid"
read -r cmd
kill -9 "$p" 2>/dev/null
wait "$p" 2>/dev/null
exit 0
"#;
const DIR_WRAPPER: &str = r#"
read -r cmd
sleep 1
if [ "$cmd" != keep ]; then rm -rf "$1"; fi
"#;

/// Where the Go-built tools live: `$THAW_TOOLS_DIR`, else `~/.cache/thaw-tools`.
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("THAW_TOOLS_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").expect("HOME is not set: cannot find ~/.cache/thaw-tools");
    PathBuf::from(home).join(".cache/thaw-tools")
}

/// A Go-built tool; a clear panic when `scripts/install-test-deps.sh` has not built it.
pub fn tool(name: &str) -> PathBuf {
    let dir = if name == "etcd" {
        format!("etcd-{ETCD_VERSION}")
    } else {
        format!("kubernetes-{KUBERNETES_VERSION}")
    };
    let path = tools_dir().join(dir).join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `bash scripts/install-test-deps.sh`, which builds it from the Go module proxy",
        path.display()
    );
    path
}

/// The repository root: the parent of the package being built (every package of the
/// workspace, including those that include this file with `#[path]`, is a top-level folder).
pub fn repo_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("package has a parent folder");
    assert!(root.join("deploy/crd.yaml").is_file(), "{} is not the thaw repository root", root.display());
    root.to_path_buf()
}

/// A free TCP port on 127.0.0.1 (free when asked; the process given it binds it soon after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("local_addr").port()
}

/// A workspace binary of the current profile (`target/<profile>/<bin>`), built with
/// `cargo build -p <package> --bin <bin>` when missing: Cargo builds only the tested
/// package's own binaries for its tests.
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("test binary in target/<profile>/deps");
    let path = profile_dir.join(bin);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--locked", "-p", package, "--bin", bin]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status();
        assert!(
            path.exists(),
            "{} is missing and `cargo build -p {package} --bin {bin}` did not make it ({status:?})",
            path.display()
        );
    }
    path
}

/// A process run under [`PROCESS_WRAPPER`]: killed on drop or [`Guarded::stop`], and when
/// the test process dies.
#[derive(Debug)]
pub struct Guarded {
    name: String,
    log: PathBuf,
    wrapper: Option<(Child, ChildStdin)>,
}

impl Guarded {
    /// Starts `cmd` (its program, arguments, environment and working directory are kept),
    /// its stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &Command, log: &Path) -> Self {
        let mut wrapper = Command::new("sh");
        wrapper.arg("-c").arg(PROCESS_WRAPPER).arg("sh").arg(log).arg(cmd.get_program()).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => wrapper.env(k, v),
                None => wrapper.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapper.current_dir(dir);
        }
        let mut child = wrapper
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} through sh: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        Self { name: name.to_owned(), log: log.to_owned(), wrapper: Some((child, stdin)) }
    }

    /// The process's name, as given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Whether the process is alive: the wrapper writes its pid next to the log, and does not
    /// reap it until told to stop, so an exited process is a zombie (`Z`) until then.
    pub fn running(&self) -> bool {
        if self.wrapper.is_none() {
            return false;
        }
        let pid_file = format!("{}.pid", self.log.display());
        let deadline = Instant::now() + Duration::from_secs(5);
        let pid = loop {
            match std::fs::read_to_string(&pid_file).map(|p| p.trim().to_owned()) {
                Ok(p) if !p.is_empty() => break p,
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                _ => return false,
            }
        };
        // /proc/PID/stat: "PID (COMM) STATE ..."; COMM may hold spaces, so split after ')'.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
            .is_some_and(|zombie| !zombie)
    }

    /// Kills the process and waits for it.
    pub fn stop(&mut self) {
        if let Some((mut child, mut stdin)) = self.wrapper.take() {
            let _ = writeln!(stdin, "stop");
            drop(stdin);
            let _ = child.wait();
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A kubectl failure: its exit status and stderr.
#[derive(Debug)]
pub struct KubectlError {
    /// `kubectl ARGS`.
    pub command: String,
    /// What kubectl printed on stderr.
    pub stderr: String,
}

impl std::fmt::Display for KubectlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {}", self.command, self.stderr.trim())
    }
}

/// A running control plane. Stopped, and its directory removed, on drop.
#[derive(Debug)]
pub struct ControlPlane {
    server: String,
    ca: PathBuf,
    admin: PathBuf,
    extender_url: String,
    // Dropped in this order: the scheduler first, etcd last, then the directory.
    scheduler: Option<Guarded>,
    apiserver: Guarded,
    etcd: Guarded,
    dir: HarnessDir,
}

/// The harness directory, removed by a guard process when dropped or when the test process
/// dies, unless [`HarnessDir::keep`] was called.
#[derive(Debug)]
struct HarnessDir {
    path: PathBuf,
    guard: Option<(Child, ChildStdin)>,
}

impl HarnessDir {
    fn new() -> Self {
        let path = tempfile::Builder::new().prefix("thaw-control-plane-").tempdir().expect("tempdir").keep();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(DIR_WRAPPER)
            .arg("sh")
            .arg(&path)
            .stdin(Stdio::piped())
            .spawn()
            .expect("starting the directory guard");
        let stdin = child.stdin.take().expect("piped stdin");
        Self { path, guard: Some((child, stdin)) }
    }

    fn keep(&mut self) {
        if let Some((mut child, mut stdin)) = self.guard.take() {
            let _ = writeln!(stdin, "keep");
            drop(stdin);
            let _ = child.wait();
        }
    }
}

impl Drop for HarnessDir {
    fn drop(&mut self) {
        if std::thread::panicking() && self.guard.is_some() {
            eprintln!("control plane directory kept: {}", self.path.display());
            self.keep();
        }
        if let Some((mut child, mut stdin)) = self.guard.take() {
            let _ = writeln!(stdin, "remove");
            drop(stdin);
            let _ = child.wait();
        }
    }
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-scheduler, the scheduler calling the extender at
    /// `extender_url` (e.g. `http://127.0.0.1:PORT`); returns once the API server is ready and
    /// the scheduler holds its leader lease.
    pub fn start(extender_url: &str) -> Self {
        let started = Instant::now();
        let dir = HarnessDir::new();

        // etcd.
        let (client_port, peer_port) = (free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(tool("etcd"));
        cmd.arg("--name=thaw")
            .arg(format!("--data-dir={}", dir.path.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=thaw={peer_url}"))
            // A test cluster lives for seconds: durability is not what is tested here.
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        let etcd = Guarded::spawn("etcd", &cmd, &dir.path.join("etcd.log"));

        // Credentials: a CA and the API server's serving certificate, service-account keys.
        let pki = dir.path.join("pki");
        std::fs::create_dir_all(&pki).expect("mkdir pki");
        generate_pki(&pki);
        let ca = pki.join("ca.crt");
        std::fs::write(
            pki.join("tokens.csv"),
            format!(
                "{ADMIN_TOKEN},thaw-test-admin,thaw-test-admin,\"system:masters\"\n\
                 {SCHEDULER_TOKEN},system:kube-scheduler,system:kube-scheduler\n"
            ),
        )
        .expect("write tokens.csv");

        wait_until("etcd", || {
            assert!(etcd.running(), "etcd exited at start:\n{}", etcd.log_tail(30));
            http_get("127.0.0.1", client_port, "/health").is_some_and(|b| b.contains("\"health\":\"true\""))
        });

        // kube-apiserver.
        let api_port = free_port();
        let server = format!("https://127.0.0.1:{api_port}");
        let mut cmd = Command::new(tool("kube-apiserver"));
        cmd.arg(format!("--etcd-servers={etcd_url}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={api_port}"))
            .arg(format!("--cert-dir={}", pki.display()))
            .arg(format!("--tls-cert-file={}", pki.join("apiserver.crt").display()))
            .arg(format!("--tls-private-key-file={}", pki.join("apiserver.key").display()))
            .arg(format!("--client-ca-file={}", ca.display()))
            .arg(format!("--token-auth-file={}", pki.join("tokens.csv").display()))
            .arg("--authorization-mode=Node,RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-account-key-file={}", pki.join("sa.pub").display()))
            .arg(format!("--service-account-signing-key-file={}", pki.join("sa.key").display()))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            // No controller-manager creates each namespace's `default` service account.
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--profiling=false")
            // The `kubernetes` Service's endpoints may not be a loopback address.
            .arg("--endpoint-reconciler-type=none");
        let apiserver = Guarded::spawn("kube-apiserver", &cmd, &dir.path.join("kube-apiserver.log"));
        let mut plane = Self {
            admin: dir.path.join("admin.kubeconfig"),
            server,
            ca,
            extender_url: extender_url.to_owned(),
            scheduler: None,
            apiserver,
            etcd,
            dir,
        };
        write_kubeconfig(&plane.admin, &plane.server, &plane.ca, ADMIN_TOKEN);
        wait_until("kube-apiserver /readyz", || {
            assert!(
                plane.apiserver.running(),
                "kube-apiserver exited at start:\n{}",
                plane.apiserver.log_tail(40)
            );
            plane.kubectl(&["get", "--raw", "/readyz"]).is_ok_and(|b| b.trim() == "ok")
        });

        plane.start_scheduler();
        eprintln!(
            "control plane {} (etcd {ETCD_VERSION}, Kubernetes {KUBERNETES_VERSION}) ready in {:.1}s, in {}",
            plane.server,
            started.elapsed().as_secs_f64(),
            plane.dir.path.display()
        );
        plane
    }

    fn start_scheduler(&mut self) {
        let kubeconfig = self.dir.path.join("scheduler.kubeconfig");
        write_kubeconfig(&kubeconfig, &self.server, &self.ca, SCHEDULER_TOKEN);
        let config = scheduler_config(&self.extender_url, &kubeconfig);
        let config_path = self.dir.path.join("scheduler-config.yaml");
        std::fs::write(&config_path, config).expect("write scheduler config");
        let mut cmd = Command::new(tool("kube-scheduler"));
        cmd.arg(format!("--config={}", config_path.display()))
            .arg(format!("--authentication-kubeconfig={}", kubeconfig.display()))
            .arg(format!("--authorization-kubeconfig={}", kubeconfig.display()))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={}", free_port()));
        let scheduler = Guarded::spawn("kube-scheduler", &cmd, &self.dir.path.join("kube-scheduler.log"));
        self.scheduler = Some(scheduler);
        // Leader election is on (the deploy/ file leaves it at its default): the scheduler
        // schedules once it holds the lease.
        wait_until("kube-scheduler's leader lease", || {
            let scheduler = self.scheduler.as_ref().expect("scheduler");
            assert!(scheduler.running(), "kube-scheduler exited at start:\n{}", scheduler.log_tail(40));
            self.kubectl(&[
                "get",
                "lease",
                "-n",
                "kube-system",
                "kube-scheduler",
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ])
            .is_ok_and(|h| !h.trim().is_empty())
        });
    }

    /// The API server's URL (`https://127.0.0.1:PORT`).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The CA certificate the API server's serving certificate chains to.
    pub fn ca_cert(&self) -> &Path {
        &self.ca
    }

    /// The admin's kubeconfig (`system:masters`).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin
    }

    /// The harness directory (logs, kubeconfigs, certificates).
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }

    /// Writes a kubeconfig for `token` into the harness directory as `<name>.kubeconfig`.
    pub fn kubeconfig_for_token(&self, name: &str, token: &str) -> PathBuf {
        let path = self.dir.path.join(format!("{name}.kubeconfig"));
        write_kubeconfig(&path, &self.server, &self.ca, token);
        path
    }

    /// `kubectl ARGS` as the admin.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, KubectlError> {
        self.kubectl_as(&self.admin, args, None)
    }

    /// `kubectl ARGS` with `kubeconfig`, `stdin` fed to it when given.
    pub fn kubectl_as(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, KubectlError> {
        let mut cmd = Command::new(tool("kubectl"));
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg("--request-timeout=30s")
            .args(args)
            .env("HOME", &self.dir.path)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting kubectl");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("piped stdin");
            pipe.write_all(input.as_bytes()).expect("writing kubectl's stdin");
        }
        let out = child.wait_with_output().expect("kubectl output");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(KubectlError {
                command: format!("kubectl {}", args.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }

    /// `kubectl ARGS` as the admin, which must succeed.
    pub fn must(&self, args: &[&str]) -> String {
        self.kubectl(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `kubectl apply -f -` of `yaml` as the admin, which must succeed.
    pub fn apply(&self, yaml: &str) -> String {
        self.kubectl_as(&self.admin, &["apply", "-f", "-"], Some(yaml))
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
    }

    /// `kubectl get ... -o json` as the admin, parsed.
    pub fn get_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.must(&[&["get"], all.as_slice()].concat());
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("kubectl get {args:?}: not JSON ({e}): {text}"))
    }

    /// Creates a `Node` that kube-scheduler treats as Ready and schedulable: no kubelet runs
    /// behind it, so bound pods stay bound and are never started. Its capacity is large, so
    /// the scheduler's own resource scores stay level across nodes as pods are bound.
    pub fn create_ready_node(&self, name: &str, labels: &[(&str, &str)]) {
        let mut label_map = serde_json::Map::new();
        label_map.insert("kubernetes.io/hostname".into(), name.into());
        label_map.insert("kubernetes.io/os".into(), "linux".into());
        for (k, v) in labels {
            label_map.insert((*k).into(), (*v).into());
        }
        let capacity = serde_json::json!({"cpu": "1000", "memory": "4Ti", "pods": "500"});
        let node = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": label_map},
            "spec": {},
        });
        self.kubectl_as(&self.admin, &["create", "-f", "-"], Some(&node.to_string()))
            .unwrap_or_else(|e| panic!("{e}"));
        // The status is a subresource: written as a kubelet would.
        let status = serde_json::json!({"status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "thaw test node (no kubelet)",
                            "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
            "nodeInfo": {"kubeletVersion": KUBERNETES_VERSION, "architecture": "amd64", "operatingSystem": "linux",
                         "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "", "osImage": "",
                         "containerRuntimeVersion": "", "kubeProxyVersion": ""}
        }});
        self.must(&[
            "patch",
            "node",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ]);
        // The API server taints a new node not-ready (TaintNodesByCondition); the node
        // lifecycle controller lifts it once the node reports Ready. No controller-manager
        // runs here, so lift it as that controller would.
        self.must(&["patch", "node", name, "--type=merge", "-p", r#"{"spec":{"taints":null}}"#]);
    }

    /// Polls `kubectl get pod` until the pod is bound; answers its node, or `None` after
    /// `timeout`.
    pub fn wait_bound(&self, namespace: &str, pod: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(node) =
                self.kubectl(&["get", "pod", "-n", namespace, pod, "-o", "jsonpath={.spec.nodeName}"])
            {
                if !node.trim().is_empty() {
                    return Some(node.trim().to_owned());
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The tails of every component's log.
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        for p in [Some(&self.etcd), Some(&self.apiserver), self.scheduler.as_ref()].into_iter().flatten() {
            out.push_str(&format!("--- {} ({})\n{}\n", p.name(), p.log().display(), p.log_tail(lines)));
        }
        out
    }

    /// Runs `test`; when it panics, prints the components' log tails, keeps the harness
    /// directory (its path is printed), and panics on.
    pub fn run<T>(&mut self, test: impl FnOnce(&Self) -> T) -> T {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(self)));
        match result {
            Ok(v) => v,
            Err(panic) => {
                self.keep_on_failure();
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// Keeps the harness directory (logs, kubeconfigs) after the processes stop, and prints
    /// where it is with the logs' tails.
    pub fn keep_on_failure(&mut self) {
        eprintln!("control plane logs kept in {}\n{}", self.dir.path.display(), self.logs(30));
        self.dir.keep();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() && self.dir.guard.is_some() {
            self.keep_on_failure();
        }
        // The scheduler first, etcd last; the directory goes after them (field order).
        if let Some(s) = self.scheduler.as_mut() {
            s.stop();
        }
        self.apiserver.stop();
        self.etcd.stop();
    }
}

/// Polls `ready` every 200 ms until it is true; panics after [`START_TIMEOUT`].
fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + START_TIMEOUT;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} not ready after {START_TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// deploy/scheduler/scheduler-config.yaml with the extender URL and kubeconfig path replaced;
/// each must appear exactly once, so the file the harness runs is the file operators install.
pub fn scheduler_config(extender_url: &str, kubeconfig: &Path) -> String {
    let path = repo_root().join("deploy/scheduler/scheduler-config.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for needle in [DEPLOY_EXTENDER_URL, DEPLOY_SCHEDULER_KUBECONFIG] {
        assert_eq!(text.matches(needle).count(), 1, "{} must name {needle} exactly once", path.display());
    }
    text.replace(DEPLOY_EXTENDER_URL, extender_url)
        .replace(DEPLOY_SCHEDULER_KUBECONFIG, &kubeconfig.display().to_string())
}

fn write_kubeconfig(path: &Path, server: &str, ca: &Path, token: &str) {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: thaw-test\n  cluster:\n    server: {server}\n    \
         certificate-authority: {ca}\nusers:\n- name: thaw-test\n  user:\n    token: {token}\ncontexts:\n- name: \
         thaw-test\n  context:\n    cluster: thaw-test\n    user: thaw-test\ncurrent-context: thaw-test\n",
        ca = ca.display()
    );
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A CA, the API server's serving certificate for 127.0.0.1/localhost signed by it, and an
/// ECDSA service-account signing key pair, all with the `openssl` command.
fn generate_pki(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .expect("running openssl (the control-plane harness needs the openssl command)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n\
         keyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=critical,CA:FALSE\n",
    )
    .expect("write server.ext");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=thaw-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &["-keyout", "apiserver.key", "-out", "apiserver.csr", "-subj", "/CN=kube-apiserver"],
    ]
    .concat());
    run(&[
        "x509",
        "-req",
        "-in",
        "apiserver.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "apiserver.crt",
    ]);
    run(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "sa.key"]);
    run(&["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}

/// A plain HTTP/1.0 GET on loopback; the body when the status is 200.
fn http_get(host: &str, port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect((host, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    // Go answers an HTTP/1.0 request with an HTTP/1.0 status line.
    (head.split(' ').nth(1) == Some("200")).then(|| body.to_owned())
}
