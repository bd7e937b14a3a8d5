//! Prefill and decode on two "hosts": network namespaces joined by a veth pair whose
//! prefill-to-decode direction is shaped with `tc tbf`. The KV transfer time the cluster
//! measures must follow the shaped bandwidth. Needs root (CAP_NET_ADMIN), `ip` and `tc`; where
//! the machine does not allow them, the test says why and passes without running.

use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shaped bandwidth of the prefill host's egress.
const RATE_MBIT: f64 = 400.0;

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces (`a`: frontend and prefill, `b`: decode) and a link from the test's own
/// namespace to `a`. Removed, with the processes started in them, on drop.
struct Hosts {
    a: String,
    b: String,
    root_if: String,
    children: Vec<Child>,
}

impl Hosts {
    fn new() -> Result<Hosts, String> {
        let id = std::process::id() % 100_000;
        let hosts = Hosts {
            a: format!("dg-a-{id}"),
            b: format!("dg-b-{id}"),
            root_if: format!("dgr{id}"),
            children: Vec::new(),
        };
        let (a, b, r) = (&hosts.a, &hosts.b, &hosts.root_if);
        let ab_a = format!("dga{id}");
        let ab_b = format!("dgb{id}");
        let ra = format!("dgn{id}");
        run(&["ip", "netns", "add", a])?;
        run(&["ip", "netns", "add", b])?;
        run(&[
            "ip", "link", "add", &ab_a, "type", "veth", "peer", "name", &ab_b,
        ])?;
        run(&["ip", "link", "set", &ab_a, "netns", a])?;
        run(&["ip", "link", "set", &ab_b, "netns", b])?;
        run(&["ip", "-n", a, "addr", "add", "10.213.1.1/24", "dev", &ab_a])?;
        run(&["ip", "-n", b, "addr", "add", "10.213.1.2/24", "dev", &ab_b])?;
        run(&["ip", "link", "add", r, "type", "veth", "peer", "name", &ra])?;
        run(&["ip", "link", "set", &ra, "netns", a])?;
        run(&["ip", "addr", "add", "10.213.2.1/24", "dev", r])?;
        run(&["ip", "-n", a, "addr", "add", "10.213.2.2/24", "dev", &ra])?;
        for (ns, dev) in [
            (a, &ab_a),
            (b, &ab_b),
            (a, &ra),
            (a, &"lo".to_string()),
            (b, &"lo".to_string()),
        ] {
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        }
        run(&["ip", "link", "set", r, "up"])?;
        let rate = format!("{RATE_MBIT}mbit");
        run(&[
            "ip", "netns", "exec", a, "tc", "qdisc", "add", "dev", &ab_a, "root", "tbf", "rate",
            &rate, "burst", "64kb", "latency", "100ms",
        ])?;
        Ok(hosts)
    }

    fn start(&mut self, ns: &str, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_disagg-hw")])
            .args(args)
            .arg("--exit-with-parent")
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.children.push(child);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = run(&["ip", "netns", "del", &self.a]);
        let _ = run(&["ip", "netns", "del", &self.b]);
        let _ = run(&["ip", "link", "del", &self.root_if]);
    }
}

const CLUSTER: &str = r#"
[model]
id = "smollm2-135m"

[frontend]
addr = "0.0.0.0:8000"
registry_addr = "0.0.0.0:8100"

# Whole transfers after the prefill, so their time is the link's alone.
[[worker]]
name = "prefill"
role = "prefill"
addr = "10.213.1.1:8201"
kv_blocks = 256
stream_kv_layers = false

[[worker]]
name = "decode"
role = "decode"
addr = "10.213.1.2:8202"
kv_addr = "10.213.1.2:8302"
kv_blocks = 256
"#;

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn kv_transfer_time_follows_the_shaped_bandwidth() {
    if !nix_root() {
        println!("skipped: needs root (CAP_NET_ADMIN) for network namespaces and tc");
        return;
    }
    if let Err(e) = run(&["tc", "-V"]) {
        println!("skipped: tc is not available ({e})");
        return;
    }
    let mut hosts = match Hosts::new() {
        Ok(hosts) => hosts,
        Err(e) => {
            println!("skipped: this machine does not allow the two-host setup: {e}");
            return;
        }
    };
    let mut config = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut config, CLUSTER.as_bytes()).unwrap();
    let path = config.path().to_str().unwrap().to_owned();
    let (a, b) = (hosts.a.clone(), hosts.b.clone());
    hosts.start(&a, &["frontend", "--config", &path]);
    hosts.start(
        &a,
        &[
            "prefill",
            "--config",
            &path,
            "--name",
            "prefill",
            "--registry",
            "10.213.1.1:8100",
        ],
    );
    hosts.start(
        &b,
        &[
            "decode",
            "--config",
            &path,
            "--name",
            "decode",
            "--registry",
            "10.213.1.1:8100",
        ],
    );

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let url = "http://10.213.2.2:8000";
    let body = |content: String| {
        json!({
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": 4,
        })
    };
    // Up when a request gets through (before the workers join, the frontend answers 503).
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let ok = http
            .post(format!("{url}/v1/chat/completions"))
            .json(&body("Hi".into()))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the two-host cluster did not come up"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let before = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Distinct long prompts: nothing is cached on the decode host, every block crosses.
    for i in 0..3 {
        let prompt = format!(
            "Story {i}: {}",
            "the quick brown fox jumps over the lazy dog. ".repeat(60)
        );
        let response = http
            .post(format!("{url}/v1/chat/completions"))
            .json(&body(prompt))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
        let _: Value = response.json().await.unwrap();
    }
    let after = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let bytes = metric(&after, "disagg_kv_transfer_bytes_total")
        - metric(&before, "disagg_kv_transfer_bytes_total");
    let seconds = metric(&after, "disagg_kv_transfer_seconds_total")
        - metric(&before, "disagg_kv_transfer_seconds_total");
    let measured_mbit = bytes * 8.0 / seconds / 1e6;
    println!(
        "shaped link {RATE_MBIT} Mbit/s: {bytes} KV bytes in {seconds:.3} s = {measured_mbit:.1} Mbit/s ({:.0}% of the shaped rate)",
        100.0 * measured_mbit / RATE_MBIT
    );
    assert!(
        bytes > 3.0 * 20e6,
        "each transfer carries the whole prompt's KV: {bytes}"
    );
    // The payload cannot beat the shaper; framing and TCP overhead keep it a little under.
    assert!(
        (RATE_MBIT * 0.6..=RATE_MBIT * 1.02).contains(&measured_mbit),
        "{measured_mbit} Mbit/s on a {RATE_MBIT} Mbit/s link"
    );
}

fn nix_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
