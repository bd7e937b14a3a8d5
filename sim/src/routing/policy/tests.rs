use proptest::prelude::*;

use super::*;
use crate::kv::KvEvent;
use crate::rng::{Stream, stream};

fn router(policy: Policy) -> Router {
    Router::new(policy, stream(1, Stream::Routing))
}

fn worker(id: WorkerId, role: Role, active_requests: u32, active_blocks: u64) -> WorkerLoad {
    WorkerLoad {
        id,
        role,
        live: true,
        active_requests,
        active_blocks,
    }
}

fn request(block_hashes: &[BlockHash]) -> RouteRequest<'_> {
    RouteRequest {
        conversation: 0,
        block_hashes,
        prompt_blocks: block_hashes.len() as u64 + 1,
    }
}

fn pick(r: &mut Router, role: Role, workers: &[WorkerLoad], index: &BlockIndex) -> WorkerId {
    r.route(role, &request(&[]), workers, index).unwrap().worker
}

const KV_GREEDY: Policy = Policy::KvAware {
    overlap_weight: 1.0,
    temperature: 0.0,
};

#[test]
fn round_robin_cycles_in_id_order_per_role() {
    let index = BlockIndex::new();
    let mut r = router(Policy::RoundRobin);
    let mut workers = vec![
        worker(7, Role::Decode, 0, 0),
        worker(2, Role::Decode, 0, 0),
        worker(5, Role::Prefill, 0, 0),
        worker(4, Role::Decode, 0, 0),
    ];
    let picks: Vec<_> = (0..4)
        .map(|_| pick(&mut r, Role::Decode, &workers, &index))
        .collect();
    assert_eq!(picks, vec![2, 4, 7, 2]);
    assert_eq!(pick(&mut r, Role::Prefill, &workers, &index), 5);
    // Worker 4 dies: the cursor (at 2) moves on to 7 without skipping or repeating.
    workers[3].live = false;
    assert_eq!(pick(&mut r, Role::Decode, &workers, &index), 7);
    assert_eq!(pick(&mut r, Role::Decode, &workers, &index), 2);
    assert!(
        r.route(Role::Aggregated, &request(&[]), &workers, &index)
            .is_none()
    );
}

#[test]
fn least_loaded_breaks_ties_by_blocks_then_id() {
    let index = BlockIndex::new();
    let mut r = router(Policy::LeastLoaded);
    let workers = [
        worker(3, Role::Prefill, 1, 5),
        worker(1, Role::Prefill, 1, 5),
        worker(0, Role::Prefill, 1, 9),
        worker(9, Role::Prefill, 2, 0),
        WorkerLoad {
            live: false,
            ..worker(4, Role::Prefill, 0, 0)
        },
    ];
    assert_eq!(pick(&mut r, Role::Prefill, &workers, &index), 1);
}

#[test]
fn session_affinity_sticks_until_the_worker_dies_or_is_forgotten() {
    let index = BlockIndex::new();
    let mut r = router(Policy::SessionAffinity);
    let conv = |conversation| RouteRequest {
        conversation,
        block_hashes: &[],
        prompt_blocks: 1,
    };
    let mut workers = vec![worker(0, Role::Decode, 0, 0), worker(1, Role::Decode, 1, 0)];
    let first = r.route(Role::Decode, &conv(42), &workers, &index).unwrap();
    assert_eq!(first.worker, 0);
    workers[0].active_requests = 5;
    assert_eq!(
        r.route(Role::Decode, &conv(42), &workers, &index).unwrap(),
        first
    );
    assert_eq!(
        r.route(Role::Decode, &conv(43), &workers, &index)
            .unwrap()
            .worker,
        1
    );
    // Forgotten: least loaded again, then remembered anew.
    r.forget(42);
    assert_eq!(
        r.route(Role::Decode, &conv(42), &workers, &index)
            .unwrap()
            .worker,
        1
    );
    workers[0].active_requests = 0;
    assert_eq!(
        r.route(Role::Decode, &conv(42), &workers, &index)
            .unwrap()
            .worker,
        1
    );
    // The remembered worker dies: move to the least loaded live one.
    workers[1].live = false;
    assert_eq!(
        r.route(Role::Decode, &conv(42), &workers, &index)
            .unwrap()
            .worker,
        0
    );
    workers[1].live = true;
    assert_eq!(
        r.route(Role::Decode, &conv(42), &workers, &index)
            .unwrap()
            .worker,
        0
    );
}

#[test]
fn kv_aware_trades_overlap_against_load() {
    let mut index = BlockIndex::new();
    let hashes = [11, 12, 13, 14];
    for &h in &hashes {
        index.apply(1, KvEvent::Stored(h));
    }
    index.apply(2, KvEvent::Stored(11));
    let req = RouteRequest {
        conversation: 0,
        block_hashes: &hashes,
        prompt_blocks: 5,
    };
    // costs: w0 = 5 + 0, w1 = 1 + 3, w2 = 4 + 0
    let mut workers = vec![
        worker(0, Role::Prefill, 0, 0),
        worker(1, Role::Prefill, 0, 3),
        worker(2, Role::Prefill, 0, 0),
    ];
    let mut r = router(KV_GREEDY);
    let d = r.route(Role::Prefill, &req, &workers, &index).unwrap();
    assert_eq!(
        d,
        RouteDecision {
            worker: 1,
            overlap_blocks: 4
        }
    );
    // w1 = 1 + 4 ties w0 = 5 and w2 = 4 + 1: the larger overlap wins the tie.
    workers[1].active_blocks = 4;
    workers[2].active_blocks = 1;
    assert_eq!(
        r.route(Role::Prefill, &req, &workers, &index)
            .unwrap()
            .worker,
        1
    );
    // Weighting overlap by 3 makes the loaded cache holder worth it still.
    workers[1].active_blocks = 10;
    let heavy = Policy::KvAware {
        overlap_weight: 3.0,
        temperature: 0.0,
    };
    assert_eq!(
        router(KV_GREEDY)
            .route(Role::Prefill, &req, &workers, &index)
            .unwrap()
            .worker,
        2
    );
    assert_eq!(
        router(heavy)
            .route(Role::Prefill, &req, &workers, &index)
            .unwrap()
            .worker,
        1
    );
}

#[test]
fn kv_aware_ties_go_to_fewer_requests_then_lowest_id() {
    let index = BlockIndex::new();
    let workers = [
        worker(5, Role::Decode, 2, 0),
        worker(3, Role::Decode, 1, 0),
        worker(4, Role::Decode, 1, 0),
    ];
    let mut r = router(KV_GREEDY);
    let d = r.route(Role::Decode, &request(&[1]), &workers, &index);
    assert_eq!(
        d,
        Some(RouteDecision {
            worker: 3,
            overlap_blocks: 0
        })
    );
}

#[test]
fn kv_aware_sampling_is_seeded_and_prefers_cheap_workers() {
    let mut index = BlockIndex::new();
    let hashes: Vec<BlockHash> = (0..8).collect();
    for &h in &hashes {
        index.apply(0, KvEvent::Stored(h));
    }
    let workers = [
        worker(0, Role::Aggregated, 0, 0),
        worker(1, Role::Aggregated, 0, 0),
        worker(2, Role::Aggregated, 0, 0),
    ];
    let policy = Policy::KvAware {
        overlap_weight: 1.0,
        temperature: 0.5,
    };
    let draws = |seed| {
        let mut r = Router::new(policy.clone(), stream(seed, Stream::Routing));
        (0..2000)
            .map(|_| {
                r.route(Role::Aggregated, &request(&hashes), &workers, &index)
                    .unwrap()
                    .worker
            })
            .collect::<Vec<_>>()
    };
    let a = draws(7);
    assert_eq!(a, draws(7));
    assert_ne!(a, draws(8));
    let mut counts = [0usize; 3];
    for &w in &a {
        counts[w as usize] += 1;
    }
    // c' = 0 for worker 0 and 1 for the others: weights 1 : e^-2 : e^-2 (~ 79% : 11% : 11%).
    assert!(counts[0] > 1400, "{counts:?}");
    assert!(counts[1] > 100 && counts[2] > 100, "{counts:?}");
}

#[test]
fn kv_aware_sampling_with_equal_costs_is_uniform() {
    let index = BlockIndex::new();
    let workers: Vec<_> = (0..4).map(|i| worker(i, Role::Decode, 0, 0)).collect();
    let mut r = router(Policy::KvAware {
        overlap_weight: 1.0,
        temperature: 1.0,
    });
    let mut counts = [0usize; 4];
    for _ in 0..4000 {
        counts[pick(&mut r, Role::Decode, &workers, &index) as usize] += 1;
    }
    assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
}

#[test]
fn policies_parse_from_toml_with_defaults() {
    #[derive(serde::Deserialize)]
    struct Cfg {
        routing: Policy,
    }
    let parse = |text: &str| toml::from_str::<Cfg>(text).map(|c| c.routing);
    assert_eq!(
        parse("[routing]\npolicy = \"round_robin\"").unwrap(),
        Policy::RoundRobin
    );
    assert_eq!(
        parse("[routing]\npolicy = \"kv_aware\"").unwrap(),
        Policy::KvAware {
            overlap_weight: 1.0,
            temperature: 0.0
        }
    );
    assert_eq!(
        parse("[routing]\npolicy = \"kv_aware\"\ntemperature = 0.25").unwrap(),
        Policy::KvAware {
            overlap_weight: 1.0,
            temperature: 0.25
        }
    );
    assert!(parse("[routing]\npolicy = \"kv_aware\"\noverlap = 2.0").is_err());
    assert!(parse("[routing]\npolicy = \"random\"").is_err());
    for p in [
        Policy::RoundRobin,
        Policy::LeastLoaded,
        Policy::SessionAffinity,
        KV_GREEDY,
    ] {
        let text = toml::to_string(&p).unwrap();
        assert_eq!(
            text.lines().next().unwrap(),
            format!("policy = \"{}\"", p.name())
        );
        assert_eq!(toml::from_str::<Policy>(&text).unwrap(), p);
        assert_eq!(p.uses_index(), p.name() == "kv_aware");
    }
}

#[test]
fn bad_kv_parameters_are_reported() {
    assert_eq!(KV_GREEDY.validate(), Ok(()));
    let bad = Policy::KvAware {
        overlap_weight: 1.0,
        temperature: -0.5,
    };
    assert_eq!(
        bad.validate(),
        Err(PolicyError::InvalidParameter {
            field: "temperature",
            value: -0.5
        })
    );
    let nan = Policy::KvAware {
        overlap_weight: f64::NAN,
        temperature: 0.0,
    };
    assert!(nan.validate().is_err());
    // Routing with them still picks an eligible worker.
    let workers = [worker(0, Role::Decode, 0, 0), worker(1, Role::Decode, 0, 0)];
    for p in [bad, nan] {
        assert!(
            router(p)
                .route(Role::Decode, &request(&[1]), &workers, &BlockIndex::new())
                .is_some()
        );
    }
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        Just(Role::Prefill),
        Just(Role::Decode),
        Just(Role::Aggregated)
    ]
}

fn policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::RoundRobin),
        Just(Policy::LeastLoaded),
        Just(Policy::SessionAffinity),
        (0.0f64..4.0, prop_oneof![Just(0.0), 0.01f64..2.0]).prop_map(
            |(overlap_weight, temperature)| Policy::KvAware {
                overlap_weight,
                temperature
            }
        ),
    ]
}

/// Workers with distinct, sparse ids in random order.
fn workers() -> impl Strategy<Value = Vec<WorkerLoad>> {
    prop::collection::btree_map(0u32..150, (role(), any::<bool>(), 0u32..4, 0u64..20), 0..12)
        .prop_map(|m| {
            m.into_iter()
                .map(
                    |(id, (role, live, active_requests, active_blocks))| WorkerLoad {
                        id,
                        role,
                        live,
                        active_requests,
                        active_blocks,
                    },
                )
                .collect::<Vec<_>>()
        })
        .prop_shuffle()
}

/// Index contents: each event stores one of a few chained hashes (prefixes of 0, 1, 2, ...).
fn index_events() -> impl Strategy<Value = Vec<(WorkerId, BlockHash)>> {
    prop::collection::vec((0u32..150, 0u64..6), 0..60)
}

fn build_index(events: &[(WorkerId, BlockHash)]) -> BlockIndex {
    let mut index = BlockIndex::new();
    for &(w, h) in events {
        index.apply(w, KvEvent::Stored(h));
    }
    index
}

proptest! {
    #[test]
    fn routes_only_to_live_workers_of_the_role(
        policy in policy(),
        seed in any::<u64>(),
        steps in prop::collection::vec(
            (workers(), role(), 0u64..4, 0usize..7),
            1..12,
        ),
        events in index_events(),
    ) {
        let index = build_index(&events);
        let hashes: Vec<BlockHash> = (0..6).collect();
        let mut r = Router::new(policy, stream(seed, Stream::Routing));
        for (workers, role, conversation, depth) in steps {
            let req = RouteRequest {
                conversation,
                block_hashes: &hashes[..depth],
                prompt_blocks: depth as u64 + 1,
            };
            let any_eligible = workers.iter().any(|w| w.live && w.role == role);
            match r.route(role, &req, &workers, &index) {
                Some(d) => {
                    let w = workers.iter().find(|w| w.id == d.worker);
                    prop_assert!(w.is_some_and(|w| w.live && w.role == role), "{:?}", d);
                    prop_assert!(d.overlap_blocks as usize <= depth);
                }
                None => prop_assert!(!any_eligible),
            }
        }
    }

    #[test]
    fn kv_aware_with_equal_loads_picks_a_longest_prefix(
        overlap_weight in 0.0f64..4.0,
        active_requests in 0u32..4,
        active_blocks in 0u64..20,
        workers in workers(),
        events in index_events(),
        depth in 0usize..7,
    ) {
        let workers: Vec<_> = workers
            .into_iter()
            .map(|w| WorkerLoad { active_requests, active_blocks, ..w })
            .collect();
        let index = build_index(&events);
        let snapshot = index.snapshot();
        let hashes: Vec<BlockHash> = (0..depth as u64).collect();
        let prefix = |id: WorkerId| {
            hashes
                .iter()
                .take_while(|h| snapshot.get(h).is_some_and(|ws| ws.contains(&id)))
                .count() as u32
        };
        let mut r = router(Policy::KvAware { overlap_weight, temperature: 0.0 });
        let req = RouteRequest {
            conversation: 0,
            block_hashes: &hashes,
            prompt_blocks: depth as u64,
        };
        for role in Role::ALL {
            let best = workers
                .iter()
                .filter(|w| w.live && w.role == role)
                .map(|w| prefix(w.id))
                .max();
            let d = r.route(role, &req, &workers, &index);
            prop_assert_eq!(d.map(|d| d.overlap_blocks), best);
            if let Some(d) = d {
                prop_assert_eq!(prefix(d.worker), d.overlap_blocks);
            }
        }
    }
}
