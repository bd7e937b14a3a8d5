//! Whole clusters as separate processes on loopback (`disagg-hw serve`), on the fetched
//! SmolLM2-135M-Instruct GGUF.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const MODEL: &str = "smollm2-135m";

/// A `disagg-hw serve` process and what it printed once ready. Killed on drop (its workers
/// die with it).
struct Served {
    child: Child,
    url: String,
    registry: String,
    pids: Vec<(String, u32)>,
    _config: tempfile::NamedTempFile,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the cluster whose workers are `workers` (TOML `[[worker]]` tables) and `router`,
/// every address on a free loopback port.
fn serve(router: &str, workers: &str) -> Served {
    let text = format!(
        "[model]\nid = \"{MODEL}\"\n[frontend]\naddr = \"127.0.0.1:0\"\nregistry_addr = \"127.0.0.1:0\"\n{router}\n{workers}"
    );
    let mut config = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut config, text.as_bytes()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_disagg-hw"))
        .args(["serve", "--config"])
        .arg(config.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines
        .next()
        .expect("serve printed nothing: it failed to start")
        .unwrap();
    let url = first
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("unexpected first line {first}"))
        .to_owned();
    let n = text.matches("[[worker]]").count();
    let pids = (0..n)
        .map(|_| {
            let line = lines.next().unwrap().unwrap();
            let mut words = line.split_whitespace().skip(1);
            let name = words.next().unwrap().to_owned();
            (name, words.nth(1).unwrap().parse().unwrap())
        })
        .collect();
    let registry = lines.next().unwrap().unwrap();
    let registry = registry.strip_prefix("registry ").unwrap().to_owned();
    Served {
        child,
        url,
        registry,
        pids,
        _config: config,
    }
}

fn worker(name: &str, role: &str, extra: &str) -> String {
    format!("[[worker]]\nname = \"{name}\"\nrole = \"{role}\"\nkv_blocks = 256\n{extra}\n")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

async fn post(url: &str, body: &Value) -> (u16, Value) {
    let response = client().post(url).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text })),
    )
}

async fn answer(served: &Served, body: Value) -> String {
    let (status, v) = post(&format!("{}/v1/chat/completions", served.url), &body).await;
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn metrics(served: &Served) -> String {
    client()
        .get(format!("{}/metrics", served.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of an unlabelled metric.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

const PROMPTS: [&str; 4] = [
    "What is the capital of France?",
    "Name three colours.",
    "Write one sentence about the sea and the wind in the evening.",
    "What is 2 + 2?",
];

#[tokio::test]
async fn prefill_and_decode_processes_answer_as_the_aggregated_worker_does() {
    let aggregated = serve("", &worker("a", "aggregated", ""));
    let disagg = serve(
        "",
        &(worker("p", "prefill", "") + &worker("d", "decode", "")),
    );
    let mut expected = Vec::new();
    for p in PROMPTS {
        expected.push(answer(&aggregated, chat(p, 24)).await);
    }
    assert!(expected[0].contains("Paris"), "{expected:?}");
    // One at a time, then all at once (batched on both workers).
    for (p, want) in PROMPTS.iter().zip(&expected) {
        assert_eq!(&answer(&disagg, chat(p, 24)).await, want);
    }
    let together =
        futures_util::future::join_all(PROMPTS.iter().map(|p| answer(&disagg, chat(p, 24)))).await;
    assert_eq!(together, expected);
    // The trace: the decode worker imports the KV after it landed, before the answer.
    let (_, v) = post(
        &format!("{}/v1/chat/completions", disagg.url),
        &chat(PROMPTS[0], 4),
    )
    .await;
    let at = |key: &str| {
        v["disagg"][key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} in {v}"))
    };
    assert!(at("transfer_end_ns") > 0, "{v}");
    assert!(at("transfer_end_ns") <= at("import_start_ns"), "{v}");
    assert!(at("import_start_ns") <= at("import_end_ns"), "{v}");
    let m = metrics(&disagg).await;
    assert_eq!(metric(&m, "disagg_kv_transfers_total"), 9.0, "{m}");
    assert!(metric(&m, "disagg_kv_transfer_bytes_total") > 0.0);

    // Garbage on the decode worker's KV port: that connection is dropped, the worker serves on.
    let workers: Value = client()
        .get(format!("{}/workers", disagg.registry))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kv_addr = workers
        .as_array()
        .unwrap()
        .iter()
        .find_map(|w| w[1]["kv_addr"].as_str())
        .unwrap()
        .to_owned();
    let mut garbage = tokio::net::TcpStream::connect(&kv_addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut garbage, &[0xAB; 4096])
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut garbage, &mut rest),
    )
    .await;
    assert!(
        read.is_ok(),
        "the KV listener kept a garbage connection open"
    );
    assert_eq!(answer(&disagg, chat(PROMPTS[1], 24)).await, expected[1]);
}

/// A completion of `prompt` for `conversation`, and the text generated.
async fn complete(served: &Served, conversation: &str, prompt: &str) -> String {
    let body = json!({
        "model": MODEL,
        "prompt": prompt,
        "temperature": 0,
        "max_tokens": 8,
        "user": conversation,
    });
    let (status, v) = post(&format!("{}/v1/completions", served.url), &body).await;
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["text"].as_str().unwrap().to_owned()
}

/// Runs four two-turn conversations one after the other on 1 prefill + 2 decode workers and
/// returns the decode workers' prefix hit ratio and the KV bytes sent.
async fn decode_hits(policy: &str) -> (f64, f64) {
    let served = serve(
        &format!("[router]\npolicy = \"{policy}\""),
        &(worker("p", "prefill", "") + &worker("d0", "decode", "") + &worker("d1", "decode", "")),
    );
    let topics = ["rivers", "mountains", "old clocks", "bees"];
    for (i, topic) in topics.iter().enumerate() {
        let conversation = format!("conversation-{i}");
        let first = format!(
            "Notes on {topic}, number {i}. {}",
            format!("A long paragraph about {topic} and why people care about {topic}. ").repeat(6)
        );
        let answer = complete(&served, &conversation, &first).await;
        let second = format!("{first}{answer} And one more thing about {topic}:");
        complete(&served, &conversation, &second).await;
    }
    let m = metrics(&served).await;
    (
        metric(&m, "disagg_decode_prefix_hit_ratio"),
        metric(&m, "disagg_kv_transfer_bytes_total"),
    )
}

#[tokio::test]
async fn kv_aware_routing_reaches_a_higher_prefix_hit_rate_than_round_robin() {
    let (kv_aware, kv_aware_bytes) = decode_hits("kv_aware").await;
    let (round_robin, round_robin_bytes) = decode_hits("round_robin").await;
    println!(
        "decode prefix hit ratio: kv_aware {kv_aware:.3} ({kv_aware_bytes} KV bytes sent), round_robin {round_robin:.3} ({round_robin_bytes} bytes)"
    );
    // Round robin alternates, so every second turn lands where its first turn is not.
    assert!(kv_aware > round_robin + 0.2, "{kv_aware} vs {round_robin}");
    assert!(kv_aware_bytes < round_robin_bytes);
}

#[tokio::test]
async fn a_full_queue_is_a_429_and_the_cluster_keeps_serving() {
    let served = serve(
        "",
        &worker("a", "aggregated", "max_num_seqs = 1\nmax_waiting = 1"),
    );
    let url = format!("{}/v1/chat/completions", served.url);
    let long = chat("Tell me a long story about a dragon.", 48);
    let statuses = futures_util::future::join_all((0..6).map(|_| post(&url, &long))).await;
    let codes: Vec<u16> = statuses.iter().map(|(s, _)| *s).collect();
    assert!(codes.contains(&429), "{codes:?}");
    assert!(codes.contains(&200), "{codes:?}");
    for (status, body) in &statuses {
        if *status == 429 {
            assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
        }
    }
    assert!(
        answer(&served, chat(PROMPTS[0], 16))
            .await
            .contains("Paris")
    );
}

#[tokio::test]
async fn a_decode_worker_killed_mid_request_is_retried_elsewhere_and_nothing_hangs() {
    let served = serve(
        "[router]\npolicy = \"round_robin\"",
        &(worker("p", "prefill", "") + &worker("d0", "decode", "") + &worker("d1", "decode", "")),
    );
    let expected = answer(&served, chat(PROMPTS[0], 16)).await;
    // A long prompt keeps the prefill (and so the transfer) in flight for a while.
    let long_prompt = format!(
        "{} {}",
        "Repeat after me: the sea is wide and the wind is cold.".repeat(60),
        PROMPTS[0]
    );
    let victim = served.pids.iter().find(|(n, _)| n == "d1").unwrap().1;
    let url = format!("{}/v1/chat/completions", served.url);
    let long_body = chat(&long_prompt, 8);
    // Round robin sends the next two requests to d1 and d0 in some order; both must end.
    let requests = futures_util::future::join_all((0..4).map(|_| post(&url, &long_body)));
    let killer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Command::new("kill")
            .args(["-9", &victim.to_string()])
            .status()
            .unwrap();
    };
    let (results, ()) = tokio::join!(requests, killer);
    for (status, body) in &results {
        // Retried on the surviving decode worker, or a clear error; never a hang.
        assert!(
            *status == 200 || body["error"]["message"].as_str().is_some(),
            "{status} {body}"
        );
    }
    assert!(results.iter().any(|(s, _)| *s == 200), "{results:?}");
    // The cluster goes on without the dead worker.
    for _ in 0..3 {
        assert_eq!(answer(&served, chat(PROMPTS[0], 16)).await, expected);
    }
}
