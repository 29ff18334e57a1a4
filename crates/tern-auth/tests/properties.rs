//! Property tests: nothing built from arbitrary input panics, and the
//! capability algebra keeps its laws.

use proptest::prelude::*;
use tern_auth::{
    sign_jwt, sign_token_request, ApiKey, Capability, KeyRing, NonceCache, Operation, TokenPolicy,
    TokenRequest,
};

fn ring() -> KeyRing {
    KeyRing::new(vec![
        ApiKey::from_key_string("app.key:secret", Capability::all()).unwrap(),
        ApiKey::from_key_string(
            "app.lim:other",
            Capability::parse(r#"{"chat:*":["subscribe"],"a:*:c":["publish"]}"#).unwrap(),
        )
        .unwrap(),
    ])
}

/// Strings biased towards the shapes the parsers look for.
fn token_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "tn1\\.[A-Za-z0-9_=-]{0,80}\\.[A-Za-z0-9_=-]{0,60}",
        "[A-Za-z0-9_=-]{0,60}\\.[A-Za-z0-9_=-]{0,80}\\.[A-Za-z0-9_=-]{0,60}",
        "eyJ[A-Za-z0-9_-]{0,60}\\.eyJ[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{0,43}",
    ]
}

fn segments() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        Just("*".to_owned()),
        Just("a".to_owned()),
        Just("b".to_owned()),
        Just(String::new()),
        Just("a*".to_owned()),
    ];
    prop::collection::vec(segment, 1..4).prop_map(|segments| segments.join(":"))
}

/// Patterns built from a small alphabet so that matches and overlaps are common.
fn pattern() -> impl Strategy<Value = String> {
    (
        prop_oneof![Just(""), Just("[meta]"), Just("[*]")],
        segments(),
    )
        .prop_map(|(qualifier, rest)| match (qualifier, rest.as_str()) {
            ("", "") => "a".to_owned(),
            _ => format!("{qualifier}{rest}"),
        })
}

fn capability() -> impl Strategy<Value = Capability> {
    prop::collection::vec((pattern(), 0u32..(1 << 17)), 0..5).prop_map(|entries| {
        Capability::from_resources(entries.into_iter().map(|(p, bits)| {
            let ops = Operation::ALL
                .into_iter()
                .enumerate()
                .filter(|(i, _)| bits & (1 << i) != 0)
                .map(|(_, op)| op)
                .collect();
            (p, ops)
        }))
        .unwrap()
    })
}

/// Channel names over the same alphabet, where `*` is just a character.
fn channel() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            Just(""),
            Just("[meta]"),
            Just("[queue]"),
            Just("[?rewind=1]")
        ],
        segments(),
    )
        .prop_map(|(qualifier, rest)| format!("{qualifier}{rest}"))
}

proptest! {
    /// Arbitrary strings into token verification return an error, never panic.
    #[test]
    fn authenticate_token_never_panics(token in token_like(), now in any::<i64>()) {
        let ring = ring();
        let _ = ring.authenticate_token(&token, now);
        let _ = ring.authenticate_bearer(&token, now);
        let _ = ring.authenticate_key(&token);
        let _ = ring.authenticate_basic(&token);
    }

    /// Changing any one character of a valid token gets it refused, never accepted
    /// with different claims.
    #[test]
    fn mutated_token_refused(index in any::<prop::sample::Index>(), replacement in any::<char>()) {
        let ring = ring();
        let key = ring.get("app.key").unwrap().clone();
        let token = ring.issue_token(&key, Some("bob"), &Capability::all(), 60_000, 0).token;
        let position = index.index(token.len());
        let original = token.as_bytes()[position] as char;
        prop_assume!(original != replacement);
        let mut mutated = token.clone();
        mutated.replace_range(position..=position, &replacement.to_string());
        prop_assert!(ring.authenticate_token(&mutated, 1).is_err(), "{}", mutated);
    }

    /// Arbitrary strings into capability parsing never panic; whatever parses
    /// survives a canonical round trip.
    #[test]
    fn capability_parse_never_panics(json in prop_oneof![
        any::<String>(),
        r#"\{("[a-z*:\[\]]{0,6}":\[("(\*|publish|subscribe|fly)",?){0,3}\],?){0,4}\}"#,
    ]) {
        if let Ok(cap) = Capability::parse(&json) {
            let text = cap.to_canonical_json();
            prop_assert_eq!(Capability::parse(&text).unwrap(), cap.clone());
            let _ = cap.ops_for(&json);
            let _ = cap.intersect(&Capability::all());
        }
    }

    /// Arbitrary token request bodies and fields never panic the checks.
    #[test]
    fn request_token_never_panics(
        body in any::<String>(),
        key_name in prop_oneof![Just("app.key".to_owned()), any::<String>()],
        ttl in proptest::option::of(any::<i64>()),
        capability in proptest::option::of(any::<String>()),
        timestamp in any::<i64>(),
        nonce in any::<String>(),
        now in any::<i64>(),
        sign in any::<bool>(),
    ) {
        let _ = TokenRequest::from_json(body.as_bytes());
        let mut req = TokenRequest {
            key_name: key_name.clone(), ttl, capability, client_id: None, timestamp, nonce,
            mac: String::new(),
        };
        if sign {
            req.mac = sign_token_request("secret", &req);
        }
        let mut nonces = NonceCache::new(4, 1_000);
        let _ = ring().request_token(&key_name, &req, now, &mut nonces, &TokenPolicy::default());
        prop_assert!(nonces.len() <= 4);
    }

    /// The intersection grants only what both sides grant, on every channel.
    #[test]
    fn intersection_is_sound(key in capability(), asked in capability(), name in channel()) {
        let got = key.intersect(&asked);
        for op in Operation::ALL {
            if got.allows(&name, op) {
                prop_assert!(key.allows(&name, op), "{} {} {:?}", got, name, op);
                prop_assert!(asked.allows(&name, op), "{} {} {:?}", got, name, op);
            }
        }
    }

    /// The intersection keeps every operation both sides grant, on every channel.
    #[test]
    fn intersection_is_complete(key in capability(), asked in capability(), name in channel()) {
        let got = key.intersect(&asked);
        let both = key.ops_for(&name).intersection(asked.ops_for(&name));
        for op in both.iter() {
            prop_assert!(got.allows(&name, op), "{} ∩ {} on {} lost {:?}", key, asked, name, op);
        }
    }

    /// A subset grants nothing its superset does not, on every channel.
    #[test]
    fn subset_is_sound(small in capability(), big in capability(), name in channel()) {
        if small.is_subset_of(&big) {
            prop_assert!(small.ops_for(&name).is_subset_of(big.ops_for(&name)));
        }
        prop_assert!(small.is_subset_of(&small));
        prop_assert!(big.intersect(&small).is_subset_of(&big));
        prop_assert!(big.intersect(&small).is_subset_of(&small));
    }

    /// Every issued token verifies before its expiry with the clientId and
    /// capability it was issued with, and is expired from then on.
    #[test]
    fn token_round_trip(
        client_id in proptest::option::of(any::<String>()),
        asked in capability(),
        ttl_ms in 1i64..=TokenPolicy::default().ttl_max_ms,
        now_ms in -1_000_000_000_000i64..4_000_000_000_000,
    ) {
        let ring = ring();
        let key = ring.get("app.lim").unwrap().clone();
        let details = ring.issue_token(&key, client_id.as_deref(), &asked, ttl_ms, now_ms);
        prop_assert!(!details.token.contains(':'));
        let ctx = ring.authenticate_token(&details.token, now_ms + ttl_ms - 1).unwrap();
        prop_assert_eq!(ctx.client_id.id(), details.client_id.as_deref().filter(|id| *id != "*"));
        prop_assert_eq!(&ctx.capability, &Capability::parse(&details.capability).unwrap());
        prop_assert_eq!(ctx.capability, key.capability.intersect(&asked));
        let err = ring.authenticate_token(&details.token, now_ms + ttl_ms).unwrap_err();
        prop_assert_eq!(err.code(), 40142);
    }

    /// However nonces arrive, the cache never holds more than its bound.
    #[test]
    fn nonce_cache_bound(ops in prop::collection::vec((0u8..20, any::<i32>()), 0..200)) {
        let mut cache = NonceCache::new(8, 100);
        for (nonce, now) in ops {
            let _ = cache.check_and_insert("k", &nonce.to_string(), i64::from(now), i64::from(now));
            prop_assert!(cache.len() <= 8);
        }
    }

    /// Signed JWTs with any time claims (NaN, infinities, 1e300 included) and any
    /// clock never panic, and whatever is accepted expires within `ttl_max_ms` (plus
    /// the clock skew a signer may be ahead by).
    #[test]
    fn jwt_times_never_panic_and_stay_bounded(
        exp in any::<f64>(),
        iat in proptest::option::of(any::<f64>()),
        nbf in proptest::option::of(any::<f64>()),
        now in prop_oneof![any::<i64>(), 1_600_000_000_000i64..1_800_000_000_000],
    ) {
        let ring = ring();
        let key = ring.get("app.key").unwrap().clone();
        let mut claims = serde_json::json!({ "exp": exp });
        if let Some(iat) = iat {
            claims["iat"] = iat.into();
        }
        if let Some(nbf) = nbf {
            claims["nbf"] = nbf.into();
        }
        if let Ok(ctx) = ring.authenticate_token(&sign_jwt(&key, &claims), now) {
            let expires_ms = ctx.expires_ms.unwrap();
            prop_assert!(expires_ms > now);
            let policy = TokenPolicy::default();
            prop_assert!(
                expires_ms.saturating_sub(now) <= policy.ttl_max_ms + policy.clock_skew_ms
            );
        }
    }
}
