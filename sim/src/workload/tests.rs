use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use super::*;
use crate::time::NS_PER_S;

fn config(text: &str) -> WorkloadConfig {
    toml::from_str(text).unwrap()
}

fn chat() -> WorkloadConfig {
    config(
        r#"
        arrival = { process = "poisson", rate_per_s = 20 }
        sessions = 200
        turns = { dist = "uniform", min = 1, max = 6 }
        system_prompt_tokens = 100
        system_prompts = 3
        user_tokens = { dist = "log_normal", mean = 200, cv = 0.8 }
        output_tokens = { dist = "exponential", mean = 150, max = 1000 }
        think_time = { dist = "exponential", mean_secs = 3 }
        "#,
    )
}

fn workload(cfg: &WorkloadConfig, seed: u64) -> Workload {
    Workload::new(cfg, seed, Path::new(".")).unwrap()
}

/// Plays the workload against a server that answers every request `latency_ns` after it
/// arrives; returns every request in creation order.
fn drive(w: &mut Workload, latency_ns: impl Fn(&Request) -> Nanos) -> Vec<Request> {
    // Keyed by id: the next open-loop arrival is fetched ahead of follow-ups created before
    // it is due.
    let mut created = BTreeMap::new();
    let mut in_flight: BinaryHeap<Reverse<(Nanos, u64)>> = BinaryHeap::new();
    let mut next = w.next_arrival();
    loop {
        let completion = in_flight.peek().map(|Reverse(c)| *c);
        match (&next, completion) {
            (Some(r), c) if c.is_none_or(|(t, _)| r.arrival_ns <= t) => {
                let r = next.take().unwrap();
                in_flight.push(Reverse((r.arrival_ns + latency_ns(&r), r.id)));
                created.insert(r.id, r);
                next = w.next_arrival();
            }
            (_, Some((t, id))) => {
                in_flight.pop();
                let done = created[&id].clone();
                if let Some(f) = w.follow_up(&done, t) {
                    assert!(f.arrival_ns >= t);
                    in_flight.push(Reverse((f.arrival_ns + latency_ns(&f), f.id)));
                    created.insert(f.id, f);
                }
            }
            _ => break,
        }
    }
    assert!(created.keys().copied().eq(0..created.len() as u64));
    created.into_values().collect()
}

fn by_conversation(reqs: &[Request]) -> BTreeMap<u64, Vec<&Request>> {
    let mut m: BTreeMap<u64, Vec<&Request>> = BTreeMap::new();
    for r in reqs {
        m.entry(r.conversation).or_default().push(r);
    }
    m
}

#[test]
fn turns_extend_their_history() {
    let mut w = workload(&chat(), 1);
    let reqs = drive(&mut w, |_| NS_PER_S);
    assert_eq!(w.sessions_started(), 200);
    assert_eq!(w.requests_created(), reqs.len() as u64);
    assert_eq!(
        w.live_conversations(),
        0,
        "finished conversations hold no state"
    );
    let convs = by_conversation(&reqs);
    assert_eq!(convs.len(), 200);
    assert!(convs.values().any(|turns| turns.len() == 6));
    for turns in convs.values() {
        let first = turns[0];
        assert_eq!((first.turn, first.history_tokens), (0, 0));
        assert!(first.prompt_tokens > 100);
        for pair in turns.windows(2) {
            let (prev, cur) = (pair[0], pair[1]);
            assert_eq!(cur.turn, prev.turn + 1);
            assert_eq!(cur.history_tokens, prev.prompt_tokens + prev.output_tokens);
            assert!(cur.prompt_tokens > cur.history_tokens);
            assert_eq!(cur.content, prev.content);
            let mut h_prev = Vec::new();
            prev.content
                .extend_block_hashes(&mut h_prev, cur.history_tokens, 16);
            let mut h_cur = Vec::new();
            cur.content
                .extend_block_hashes(&mut h_cur, cur.prompt_tokens, 16);
            assert_eq!(&h_cur[..h_prev.len()], &h_prev[..]);
        }
    }
}

#[test]
fn system_prompts_are_shared_across_conversations() {
    let mut w = workload(&chat(), 2);
    let mut systems = BTreeMap::new();
    while let Some(r) = w.next_arrival() {
        let Content::Synthetic {
            system,
            system_tokens,
            stream,
        } = r.content
        else {
            panic!("synthetic workloads have synthetic content");
        };
        assert_eq!(system_tokens, 100);
        assert_ne!(system, 0);
        assert_ne!(stream, 0);
        *systems.entry(system).or_insert(0) += 1;
    }
    assert_eq!(systems.len(), 3);
    assert!(systems.values().all(|&n| n > 40), "{systems:?}");
}

#[test]
fn think_time_separates_answer_and_next_turn() {
    let mut cfg = chat();
    cfg.think_time = DurationDist::Constant { secs: 2.5 };
    cfg.turns = LengthDist::Constant { value: 3 };
    let mut w = workload(&cfg, 3);
    let first = w.next_arrival().unwrap();
    let done_ns = first.arrival_ns + 7;
    let second = w.follow_up(&first, done_ns).unwrap();
    assert_eq!(second.arrival_ns, done_ns + 2_500_000_000);
    assert_eq!(second.id, 1);
    assert!(
        w.follow_up(&first, done_ns).is_none(),
        "a turn has one successor"
    );
    let third = w.follow_up(&second, second.arrival_ns + 1).unwrap();
    assert_eq!(third.turn, 2);
    assert!(w.follow_up(&third, third.arrival_ns + 1).is_none());
}

#[test]
fn abandoned_conversations_send_nothing_more() {
    let mut cfg = chat();
    cfg.turns = LengthDist::Constant { value: 5 };
    let mut w = workload(&cfg, 4);
    let first = w.next_arrival().unwrap();
    assert_eq!(w.live_conversations(), 1);
    w.abandon(first.conversation);
    assert_eq!(w.live_conversations(), 0);
    assert!(w.follow_up(&first, first.arrival_ns + 1).is_none());
}

#[test]
fn max_prompt_tokens_ends_conversations() {
    let mut cfg = chat();
    cfg.turns = LengthDist::Constant { value: 50 };
    cfg.max_prompt_tokens = Some(2_000);
    let mut w = workload(&cfg, 5);
    let reqs = drive(&mut w, |_| NS_PER_S);
    assert!(reqs.iter().all(|r| r.prompt_tokens <= 2_000));
    let convs = by_conversation(&reqs);
    assert!(convs.values().all(|t| t.len() < 50));
    assert!(convs.values().any(|t| t.len() > 3));
    assert_eq!(w.live_conversations(), 0);

    let mut tiny = chat();
    tiny.user_tokens = Some(LengthDist::Constant { value: 500 });
    tiny.max_prompt_tokens = Some(300);
    let mut w = workload(&tiny, 5);
    let first = w.next_arrival().unwrap();
    assert_eq!(first.prompt_tokens, 300, "a first prompt is cut to fit");
}

#[test]
fn sessions_and_duration_limit_starts() {
    let mut cfg = chat();
    cfg.sessions = Some(17);
    let mut w = workload(&cfg, 6);
    let mut n = 0;
    while w.next_arrival().is_some() {
        n += 1;
    }
    assert_eq!((n, w.sessions_started()), (17, 17));
    assert!(w.next_arrival().is_none());

    cfg.sessions = None;
    cfg.duration_s = Some(50.0);
    let mut w = workload(&cfg, 6);
    let mut last = 0;
    while let Some(r) = w.next_arrival() {
        assert!(r.arrival_ns >= last);
        last = r.arrival_ns;
    }
    assert!(last < 50 * NS_PER_S);
    let started = w.sessions_started() as f64;
    assert!((started - 1000.0).abs() < 120.0, "20/s for 50 s: {started}");

    cfg.sessions = Some(10);
    let mut w = workload(&cfg, 6);
    while w.next_arrival().is_some() {}
    assert_eq!(w.sessions_started(), 10, "whichever limit comes first");
}

#[test]
fn same_seed_same_requests_different_seed_different() {
    let cfg = chat();
    let a = drive(&mut workload(&cfg, 9), |_| NS_PER_S / 2);
    let b = drive(&mut workload(&cfg, 9), |_| NS_PER_S / 2);
    assert_eq!(a, b);
    let c = drive(&mut workload(&cfg, 10), |_| NS_PER_S / 2);
    assert_ne!(a, c);
}

#[test]
fn a_conversations_plan_ignores_what_the_cluster_does() {
    let cfg = chat();
    let fast = drive(&mut workload(&cfg, 11), |_| NS_PER_S / 10);
    let slow = drive(&mut workload(&cfg, 11), |r| {
        (r.prompt_tokens as u64 % 7 + 1) * NS_PER_S
    });
    let plan = |reqs: &[Request]| {
        by_conversation(reqs)
            .into_values()
            .map(|turns| {
                turns
                    .iter()
                    .map(|r| {
                        (
                            r.turn,
                            r.prompt_tokens,
                            r.history_tokens,
                            r.output_tokens,
                            r.content.clone(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(plan(&fast), plan(&slow));
    let firsts = |reqs: &[Request]| {
        reqs.iter()
            .filter(|r| r.turn == 0)
            .map(|r| r.arrival_ns)
            .collect::<Vec<_>>()
    };
    assert_eq!(firsts(&fast), firsts(&slow), "arrivals are open loop");
}

#[test]
fn config_validation_names_the_field() {
    let msg = |text: &str| config(text).validate().unwrap_err().to_string();
    assert_eq!(
        msg(
            "sessions = 3\nuser_tokens = { dist = \"constant\", value = 1 }\noutput_tokens = { dist = \"constant\", value = 1 }"
        ),
        "workload.arrival: is required unless workload.trace is set"
    );
    let base = "arrival = { process = \"poisson\", rate_per_s = 1 }\n";
    assert!(
        msg(&format!("{base}sessions = 3\nuser_tokens = {{ dist = \"log_normal\", mean = -5, cv = 1 }}\noutput_tokens = {{ dist = \"constant\", value = 1 }}"))
            .starts_with("workload.user_tokens.mean: ")
    );
    assert!(
        msg(&format!("{base}user_tokens = {{ dist = \"constant\", value = 1 }}\noutput_tokens = {{ dist = \"constant\", value = 1 }}"))
            .starts_with("workload.sessions: workload.sessions or workload.duration_s is required")
    );
    assert_eq!(
        msg(&format!(
            "{base}sessions = 3\nuser_tokens = {{ dist = \"constant\", value = 1 }}"
        )),
        "workload.output_tokens: is required unless workload.trace is set"
    );
    assert!(
        msg("arrival = { process = \"gamma\", rate_per_s = 1, cv = -1 }\nsessions = 1\nuser_tokens = { dist = \"constant\", value = 1 }\noutput_tokens = { dist = \"constant\", value = 1 }")
            .starts_with("workload.arrival.cv: ")
    );
    assert!(
        msg(&format!("{base}sessions = 3\nsystem_prompt_tokens = 50\nmax_prompt_tokens = 50\nuser_tokens = {{ dist = \"constant\", value = 1 }}\noutput_tokens = {{ dist = \"constant\", value = 1 }}"))
            .starts_with("workload.max_prompt_tokens: ")
    );
    assert!(
        msg(&format!("{base}trace = \"t.csv\""))
            .starts_with("workload.arrival: does not apply when workload.trace is set")
    );
    assert!(msg("trace = \"t.csv\"\nduration_s = -1").starts_with("workload.duration_s: "));
    assert!(toml::from_str::<WorkloadConfig>("trace = \"t.csv\"\nsesions = 3").is_err());
    assert!(config("trace = \"t.csv\"").validate().is_ok());
    assert!(chat().validate().is_ok());
}

#[test]
fn trace_replay_is_open_loop_and_relative_to_the_scenario() {
    let dir = std::env::temp_dir().join(format!("workload-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("t.csv"),
        "arrival_ns,conversation_id,prompt_tokens,output_tokens\n\
         3000000000,1,200,10\n\
         1000000000,1,100,10\n\
         2000000000,2,50,10\n",
    )
    .unwrap();
    let cfg = config("trace = \"t.csv\"\nduration_s = 2.5");
    let mut w = Workload::new(&cfg, 0, &dir).unwrap();
    let first = w.next_arrival().unwrap();
    assert_eq!((first.arrival_ns, first.conversation), (NS_PER_S, 1));
    assert!(w.follow_up(&first, 5).is_none());
    let second = w.next_arrival().unwrap();
    assert_eq!(second.conversation, 2);
    assert!(w.next_arrival().is_none(), "the 3 s row is past duration_s");
    assert_eq!((w.sessions_started(), w.requests_created()), (2, 2));

    let missing = Workload::new(&config("trace = \"nope.csv\""), 0, &dir)
        .err()
        .unwrap();
    assert!(missing.to_string().contains("nope.csv: "), "{missing}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn generated_requests_round_trip_through_a_trace() {
    let reqs = drive(&mut workload(&chat(), 12), |_| NS_PER_S);
    let mut sorted = reqs.clone();
    sorted.sort_by_key(|r| r.arrival_ns);
    let mut csv = Vec::new();
    write_trace(&mut csv, &sorted).unwrap();
    let back = read_trace_from(csv.as_slice(), "gen.csv").unwrap();
    let shape = |r: &Request| {
        (
            r.arrival_ns,
            r.conversation,
            r.prompt_tokens,
            r.output_tokens,
        )
    };
    assert_eq!(
        back.iter().map(shape).collect::<Vec<_>>(),
        sorted.iter().map(shape).collect::<Vec<_>>()
    );
    for (b, s) in back.iter().zip(&sorted) {
        assert_eq!((b.turn, b.history_tokens), (s.turn, s.history_tokens));
    }
}
