//! The load generator against the real aggregated engine (SmolLM2-135M-Instruct on the CPU)
//! behind the HTTP frontend on loopback: token-id prompts, `ignore_eos`, returned ids, and a
//! small multi-turn run recorded in the simulator's schema.

use hw::engine::{EngineBackend, EngineConfig};
use hw::frontend::{Metrics, ServerConfig, serve_listener};
use hw::loadgen::{BenchOptions, run};
use models::runtime::{Device, TensorDType};
use serde_json::{Value, json};
use sim::config::Scenario;
use std::sync::Arc;

const MODEL: &str = "smollm2-135m";

const SCENARIO: &str = r#"
name = "bench-engine-test"
seed = 4
[model]
preset = "smollm2-135m"
[workload]
arrival = { process = "constant", rate_per_s = 50.0 }
sessions = 2
turns = { dist = "constant", value = 2 }
system_prompt_tokens = 16
user_tokens = { dist = "uniform", min = 8, max = 24 }
output_tokens = { dist = "uniform", min = 3, max = 6 }
[[setup]]
name = "one"
hardware = "dgx-spark"
link = "tcp-10g"
mode = "aggregated"
aggregated_workers = 1
"#;

async fn start_server() -> String {
    let config = EngineConfig {
        kv_blocks: 64,
        ..EngineConfig::default()
    };
    let path = models::runtime::test_gguf_path().unwrap();
    let backend =
        EngineBackend::from_gguf(&path, MODEL, TensorDType::F32, &Device::Cpu, config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve_listener(
        listener,
        Arc::new(backend),
        Arc::new(Metrics::new()),
        ServerConfig::default(),
        std::future::pending(),
    ));
    url
}

async fn complete(url: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_serves_token_prompts_and_the_load_generator_records_them() {
    let url = start_server().await;

    // Token ids in, exactly max_tokens out with ignore_eos, every id returned.
    let (status, v) = complete(
        &url,
        json!({ "model": MODEL, "prompt": [1, 504, 2000, 17, 9], "max_tokens": 12,
                "temperature": 0, "ignore_eos": true, "return_token_ids": true }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["token_ids"].as_array().unwrap().len(), 12);
    assert_eq!(v["disagg"]["prefill_worker"], 0);
    assert_eq!(v["disagg"]["decode_worker"], 0);

    let (status, v) = complete(&url, json!({ "model": MODEL, "prompt": [3, 49_152] })).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "prompt");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("49152"),
        "{v}"
    );

    let scenario = Scenario::parse(SCENARIO, "test.toml", ".".into()).unwrap();
    let out = run(&scenario, &BenchOptions::new(url.clone()))
        .await
        .unwrap();
    assert_eq!(out.model, MODEL);
    assert_eq!(out.records.len(), 4);
    for r in &out.records {
        assert!(r.is_completed(), "{r:?}");
        assert_eq!((r.prefill_worker, r.decode_worker), (Some(0), Some(0)));
        assert!((3..=6).contains(&r.output_tokens), "{r:?}");
        assert!(r.arrival_ns < r.first_token_ns && r.first_token_ns <= r.end_ns);
    }
    let follow_up = out.records.iter().find(|r| r.turn == 1).unwrap();
    assert!(follow_up.history_tokens > 16);
    assert_eq!(out.summary.completed, 4);
}
