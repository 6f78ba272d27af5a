//! Placement: weighted rendezvous hashing (HRW) with bounded load.
//!
//! HRW gives every session id a full ranking of the backends. Removing a backend moves only
//! the sessions it held; adding one takes about 1/(N+1) of new placements; and every replica
//! computes the same ranking from the same names, without talking. The hash is defined here
//! (FNV-1a folded through a 64-bit finalizer) rather than taken from `std`, whose hasher may
//! change between Rust releases and would then split replicas built with different compilers.

/// A candidate for placement, as the balancer sees it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    /// Stable backend name (the hash input; addresses may change, names should not).
    pub name: &'a str,
    /// Relative weight (> 0).
    pub weight: f64,
    /// Whether it may take new sessions (up and not draining).
    pub eligible: bool,
    /// Live sessions now.
    pub live: u64,
    /// Hard cap on live sessions, if any.
    pub max_sessions: Option<u64>,
}

/// Why no backend could be chosen.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlaceError {
    /// Every backend is down, draining, or full.
    #[error("no backend can take a new session (all are down, draining or at max_sessions)")]
    NoneAvailable,
}

fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The 64-bit hash of (backend, key) that every replica computes identically.
pub fn pair_hash(backend: &str, key: &str) -> u64 {
    let h = fnv1a(backend.as_bytes(), 0xcbf2_9ce4_8422_2325);
    // A separator byte keeps ("ab","c") and ("a","bc") apart.
    let h = fnv1a(&[0xff], h);
    fmix64(fnv1a(key.as_bytes(), h))
}

/// Weighted rendezvous score: -w / ln(u) with u uniform in (0, 1).
pub fn score(backend: &str, weight: f64, key: &str) -> f64 {
    let h = pair_hash(backend, key);
    // 53 random bits, shifted off zero so ln(u) is finite and negative.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -weight / u.ln()
}

/// Ranks candidate indices for `key`, best first. Ties break by name so the order is total.
pub fn rank<'a>(key: &str, names: impl IntoIterator<Item = (&'a str, f64)>) -> Vec<usize> {
    let mut scored: Vec<(usize, f64, &str)> = names
        .into_iter()
        .enumerate()
        .map(|(i, (n, w))| (i, score(n, w, key), n))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.2.cmp(b.2)));
    scored.into_iter().map(|(i, _, _)| i).collect()
}

/// The bounded-load cap for one backend: `ceil(c * (total + 1) / n * share)`, where share is
/// its weight over the mean weight, so heavier backends may hold proportionally more.
fn load_cap(c: f64, total_live: u64, n: usize, weight: f64, mean_weight: f64) -> u64 {
    let avg = (total_live + 1) as f64 / n as f64;
    (c * avg * (weight / mean_weight)).ceil().max(1.0) as u64
}

/// Picks a backend for a new session: the first in its ranking that is eligible, under its
/// `max_sessions`, and under the bounded-load cap. If only the cap stands in the way, the
/// first eligible backend under `max_sessions` is taken: the cap spreads load, it never
/// refuses work that a backend could take.
pub fn place(key: &str, candidates: &[Candidate], c: f64) -> Result<usize, PlaceError> {
    let order = rank(key, candidates.iter().map(|b| (b.name, b.weight)));
    let eligible: Vec<&Candidate> = candidates.iter().filter(|b| b.eligible).collect();
    if eligible.is_empty() {
        return Err(PlaceError::NoneAvailable);
    }
    let total: u64 = eligible.iter().map(|b| b.live).sum();
    let mean_w = eligible.iter().map(|b| b.weight).sum::<f64>() / eligible.len() as f64;
    let under_max = |b: &Candidate| b.max_sessions.is_none_or(|m| b.live < m);
    let mut fallback = None;
    for i in order {
        let b = &candidates[i];
        if !b.eligible || !under_max(b) {
            continue;
        }
        if b.live < load_cap(c, total, eligible.len(), b.weight, mean_w) {
            return Ok(i);
        }
        fallback.get_or_insert(i);
    }
    fallback.ok_or(PlaceError::NoneAvailable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("cli-{i}")).collect()
    }

    fn home(key: &str, backends: &[String]) -> String {
        let order = rank(key, backends.iter().map(|n| (n.as_str(), 1.0)));
        backends[order[0]].clone()
    }

    #[test]
    fn known_vector_is_stable() {
        // Pinned so a change of hash (which would split replicas) fails loudly.
        assert_eq!(pair_hash("cli-1", "session-1"), 14_950_458_250_423_803_895);
        let r = rank("session-1", [("a", 1.0), ("b", 1.0), ("c", 1.0)]);
        assert_eq!(r, vec![2, 1, 0]);
    }

    #[test]
    fn weights_shift_share() {
        let mut count: HashMap<usize, u32> = HashMap::new();
        for i in 0..20000 {
            let r = rank(&format!("k{i}"), [("a", 1.0), ("b", 3.0)]);
            *count.entry(r[0]).or_default() += 1;
        }
        let b_share = f64::from(count[&1]) / 20000.0;
        assert!((b_share - 0.75).abs() < 0.02, "b share {b_share}");
    }

    #[test]
    fn bounded_load_spreads_a_burst() {
        let mut live = [0u64; 3];
        let n = names(3);
        for i in 0..300 {
            let cands: Vec<Candidate> = n
                .iter()
                .enumerate()
                .map(|(j, name)| Candidate {
                    name,
                    weight: 1.0,
                    eligible: true,
                    live: live[j],
                    max_sessions: None,
                })
                .collect();
            let pick = place(&format!("s{i}"), &cands, 1.25).unwrap();
            live[pick] += 1;
            let cap = (1.25 * (i as f64 + 1.0) / 3.0).ceil() as u64;
            assert!(live.iter().all(|l| *l <= cap.max(1)), "{live:?} cap {cap}");
        }
    }

    #[test]
    fn max_sessions_and_eligibility_respected() {
        let cands = [
            Candidate {
                name: "a",
                weight: 1.0,
                eligible: false,
                live: 0,
                max_sessions: None,
            },
            Candidate {
                name: "b",
                weight: 1.0,
                eligible: true,
                live: 2,
                max_sessions: Some(2),
            },
            Candidate {
                name: "c",
                weight: 1.0,
                eligible: true,
                live: 50,
                max_sessions: None,
            },
        ];
        for i in 0..50 {
            assert_eq!(place(&format!("k{i}"), &cands, 1.25), Ok(2));
        }
        let none = [Candidate {
            name: "a",
            weight: 1.0,
            eligible: false,
            live: 0,
            max_sessions: None,
        }];
        assert_eq!(place("k", &none, 1.25), Err(PlaceError::NoneAvailable));
    }

    proptest! {
        #[test]
        fn ranking_is_a_permutation(key in ".{0,40}", n in 1usize..12) {
            let ns = names(n);
            let mut r = rank(&key, ns.iter().map(|s| (s.as_str(), 1.0)));
            r.sort();
            prop_assert_eq!(r, (0..n).collect::<Vec<_>>());
        }

        #[test]
        fn ranking_ignores_input_order(key in ".{0,40}", n in 2usize..10, rot in 0usize..10) {
            let ns = names(n);
            let mut rotated = ns.clone();
            rotated.rotate_left(rot % n);
            let a: Vec<String> = rank(&key, ns.iter().map(|s| (s.as_str(), 1.0))).into_iter().map(|i| ns[i].clone()).collect();
            let b: Vec<String> = rank(&key, rotated.iter().map(|s| (s.as_str(), 1.0))).into_iter().map(|i| rotated[i].clone()).collect();
            prop_assert_eq!(a, b);
        }

        #[test]
        fn removing_a_backend_moves_only_its_sessions(n in 2usize..10, victim in 0usize..10) {
            let ns = names(n);
            let victim = victim % n;
            let rest: Vec<String> = ns.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, s)| s.clone()).collect();
            for k in 0..500 {
                let key = format!("sess-{k}");
                let before = home(&key, &ns);
                let after = home(&key, &rest);
                if before != ns[victim] {
                    prop_assert_eq!(before, after);
                }
            }
        }

        #[test]
        fn adding_a_backend_moves_about_one_in_n_plus_one(n in 2usize..9) {
            let ns = names(n);
            let mut more = ns.clone();
            more.push("cli-new".into());
            let keys = 4000;
            let mut moved = 0;
            for k in 0..keys {
                let key = format!("sess-{k}");
                let before = home(&key, &ns);
                let after = home(&key, &more);
                if before != after {
                    prop_assert_eq!(after.as_str(), "cli-new");
                    moved += 1;
                }
            }
            let expect = keys as f64 / (n as f64 + 1.0);
            prop_assert!((moved as f64 - expect).abs() < expect * 0.25, "moved {} expect {}", moved, expect);
        }

        #[test]
        fn bounded_load_holds(n in 1usize..8, sessions in 1usize..400, c in 1.1f64..2.0) {
            let ns = names(n);
            let mut live = vec![0u64; n];
            for i in 0..sessions {
                let cands: Vec<Candidate> = ns.iter().enumerate().map(|(j, name)| Candidate {
                    name, weight: 1.0, eligible: true, live: live[j], max_sessions: None,
                }).collect();
                let total: u64 = live.iter().sum();
                let pick = place(&format!("s{i}"), &cands, c).unwrap();
                let cap = (c * (total as f64 + 1.0) / n as f64).ceil() as u64;
                prop_assert!(live[pick] < cap.max(1));
                live[pick] += 1;
            }
        }
    }
}
