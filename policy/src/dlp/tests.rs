//! Scanner-level tests: detectors end to end, evasions, redaction, streams.

use std::sync::Arc;

use super::literals::{base64_std, url_safe};
use super::*;

fn all() -> Scanner {
    Scanner::new(&[DetectorSet::Secrets, DetectorSet::Pii], &[]).unwrap()
}

fn found(body: &str) -> Vec<(String, u32)> {
    found_as(body.as_bytes(), BodyFormat::Text)
}

fn found_as(body: &[u8], format: BodyFormat) -> Vec<(String, u32)> {
    all()
        .scan(body, format, &Literals::empty())
        .iter()
        .map(|(n, c)| (n.to_owned(), c))
        .collect()
}

fn one(name: &str) -> Vec<(String, u32)> {
    vec![(name.to_owned(), 1)]
}

/// Deterministic pseudo-random bytes (xorshift), for blobs.
fn noise(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

const AWS: &str = "AKIAIOSFODNN7EXAMPLE";
const JWT: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";

fn pem(label: &str, body_lines: usize) -> String {
    let mut s = format!("-----BEGIN {label}-----\n");
    for i in 0..body_lines {
        let line: String = base64_std(&noise(48, i as u64 + 1))
            .into_iter()
            .map(char::from)
            .collect();
        s.push_str(&line);
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----"));
    s
}

fn secrets() -> Vec<(&'static str, String)> {
    vec![
        ("aws_access_key_id", AWS.to_owned()),
        ("aws_access_key_id", "ASIAY34FZKBOKMUTVV7A".to_owned()),
        ("github_token", format!("ghp_{}", "aB3".repeat(12))),
        ("github_token", format!("gho_{}", "Zq9x".repeat(9))),
        (
            "github_token",
            format!("github_pat_11ABCDEFG0_{}Ab", "xY7".repeat(23)),
        ),
        ("openai_api_key", format!("sk-{}", "T3BlbkFJ".repeat(6))),
        (
            "openai_api_key",
            format!("sk-proj-{}", "Ab3dEf6hIj9kLm_-".repeat(8)),
        ),
        (
            "openai_api_key",
            format!("sk-svcacct-{}", "Qw3Rt5Yu7Io9".repeat(4)),
        ),
        (
            "openai_api_key",
            format!("sk-admin-{}", "Qw3Rt5Yu7Io9".repeat(4)),
        ),
        (
            "anthropic_api_key",
            format!("sk-ant-api03-{}AA", "Xy9_Zw8-Vu7t".repeat(8)),
        ),
        (
            "slack_token",
            "xoxb-1234567890-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx".to_owned(),
        ),
        (
            "slack_token",
            "xoxp-1234567890-1234567890-1234567890123-0123456789abcdef".to_owned(),
        ),
        (
            "slack_token",
            "xapp-1-A0123456789-1234567890123-abcdef0123456789".to_owned(),
        ),
        (
            "google_api_key",
            format!(
                "AIzaSy{}",
                "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q_-"[..33].to_owned()
            ),
        ),
        (
            "stripe_live_key",
            format!("sk_live_{}", "4eC39HqLyjWDarjtT1zdp7dc"),
        ),
        (
            "stripe_live_key",
            format!("rk_live_{}", "51H8cJ2eZvKYlo2C0aBcDeFgHiJk"),
        ),
        ("jwt", JWT.to_owned()),
        ("private_key", pem("RSA PRIVATE KEY", 3)),
        ("private_key", pem("PRIVATE KEY", 2)),
        ("private_key", pem("OPENSSH PRIVATE KEY", 2)),
        ("private_key", pem("EC PRIVATE KEY", 1)),
        ("private_key", pem("ENCRYPTED PRIVATE KEY", 1)),
        ("private_key", pem("PGP PRIVATE KEY BLOCK", 1)),
    ]
}

fn pii() -> Vec<(&'static str, &'static str)> {
    vec![
        ("email", "alice.smith+tag@example.co.uk"),
        ("email", "bob@mail.example.com"),
        ("payment_card", "4111 1111 1111 1111"),
        ("payment_card", "4111111111111111"),
        ("payment_card", "5500-0000-0000-0004"),
        ("payment_card", "378282246310005"),
        ("payment_card", "6011111111111117"),
        ("us_ssn", "123-45-6789"),
        ("us_ssn", "078 05 1120"),
        ("iban", "GB82 WEST 1234 5698 7654 32"),
        ("iban", "DE89370400440532013000"),
        ("iban", "NO9386011117947"),
    ]
}

#[test]
fn every_detector_finds_its_samples() {
    for (name, sample) in secrets() {
        let body = format!("here it is: {sample} (done)");
        assert_eq!(found(&body), one(name), "{name}: {sample}");
    }
    for (name, sample) in pii() {
        let body = format!("here it is: {sample} (done)");
        assert_eq!(found(&body), one(name), "{name}: {sample}");
    }
}

#[test]
fn numbers_in_lists_are_read_one_by_one() {
    assert_eq!(
        found("4111111111111111,5500000000000004;378282246310005"),
        vec![("payment_card".to_owned(), 3)]
    );
    assert_eq!(
        found("[\"123-45-6789\",\"219-09-9999\"]"),
        vec![("us_ssn".to_owned(), 2)]
    );
    // A card at a group start inside a longer grouped number is not a card.
    assert_eq!(
        found("ref 1234 4111 1111 1111 1111 and 4111 1111 1111 1111 1234"),
        vec![]
    );
}

#[test]
fn private_key_header_alone_is_a_finding() {
    assert_eq!(
        found("starts with -----BEGIN RSA PRIVATE KEY----- and then?"),
        one("private_key")
    );
}

#[test]
fn false_positive_traps() {
    let traps = [
        pem("CERTIFICATE", 4),
        pem("PUBLIC KEY", 2),
        pem("RSA PUBLIC KEY", 2),
        format!(
            "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ{} user@host",
            String::from_utf8(base64_std(&noise(200, 9))).unwrap()
        ),
        "id 123e4567-e89b-12d3-a456-426614174000 and 550e8400-e29b-41d4-a716-446655440000"
            .to_owned(),
        "md5 d41d8cd98f00b204e9800998ecf8427e sha1 da39a3ee5e6b4b0d3255bfef95601890afd80709"
            .to_owned(),
        "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".to_owned(),
        "SHA256 E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855".to_owned(),
        "card 4111111111111112 and 4111 1111 1111 1112".to_owned(),
        "order 41111111111111110000 ref 12345678901234567890123 x 9994111111111111111".to_owned(),
        "total 1,234,567,890,123,456.00 and 4111111111111111.5".to_owned(),
        "at 1700000000000 ms, 2024-01-15T12:30:45.123Z, epoch 1700000000".to_owned(),
        "call +1 555 123 4567 or +44 20 7946 0958 or (555) 123-4567 or 555-123-4567".to_owned(),
        "+4111111111111111 is a phone number here".to_owned(),
        "ssn-like 000-12-3456 666-12-3456 900-12-3456 123-00-4567 123-45-0000".to_owned(),
        "part number 1234-12-12345 or 12-123-45-6789".to_owned(),
        "pip install sk-learn; sk-learn-contrib-imbalanced-learn; risk-assessment".to_owned(),
        "sk-this_is_not_a_real_key_at_all".to_owned(),
        "IBAN GB82 WEST 1234 5698 7654 33 is wrong; ZZ82WEST12345698765432".to_owned(),
        "icons: logo@2x.png and email-ish foo@bar".to_owned(),
        "version v1.2.3 on 10.0.0.1:8080, price $1,299.99".to_owned(),
    ];
    for t in &traps {
        assert_eq!(found(t), vec![], "{t}");
    }
    for seed in 1..20 {
        let blob = base64_std(&noise(4096, seed));
        assert_eq!(
            found_as(&blob, BodyFormat::Text),
            vec![],
            "base64 blob {seed}"
        );
        let with_lines: Vec<u8> = blob
            .chunks(76)
            .flat_map(|c| c.iter().copied().chain([b'\n']))
            .collect();
        assert_eq!(
            found_as(&with_lines, BodyFormat::Text),
            vec![],
            "base64 lines {seed}"
        );
    }
}

#[test]
fn anthropic_key_is_not_an_openai_key() {
    let key = format!("sk-ant-api03-{}AA", "Xy9_Zw8-Vu7t".repeat(8));
    assert_eq!(found(&key), one("anthropic_api_key"));
}

#[test]
fn json_escaped_secrets_are_found() {
    let body = format!(
        r#"{{"a":"\u0041KIAIOSFODNN7EXAMPLE","b":"{}","c":"k=\"{}\""}}"#,
        r"\u0073k-ant-api03-Xy9_Zw8-Vu7tXy9_Zw8-Vu7tXy9_Zw8-Vu7tAA",
        "ghp_aB3aB3aB3aB3aB3aB3aB3aB3aB3aB3aB3aB3"
    );
    let f = found_as(body.as_bytes(), BodyFormat::Json);
    assert_eq!(
        f,
        vec![
            ("anthropic_api_key".to_owned(), 1),
            ("aws_access_key_id".to_owned(), 1),
            ("github_token".to_owned(), 1)
        ]
    );
}

#[test]
fn json_pem_block_is_found_and_redacted_whole() {
    let key = pem("RSA PRIVATE KEY", 6);
    let body = serde_json::to_vec(&serde_json::json!({"messages":[{"role":"user","content": format!("my key:\n{key}\nthanks")}]}))
        .unwrap();
    let (out, f) = all().redact(&body, BodyFormat::Json, &Literals::empty());
    assert_eq!(f.iter().collect::<Vec<_>>(), vec![("private_key", 1)]);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        v["messages"][0]["content"],
        "my key:\n[REDACTED:private_key]\nthanks"
    );
}

#[test]
fn double_encoded_json_is_decoded() {
    // Tool-call arguments: JSON inside a JSON string.
    let inner = serde_json::json!({"token": format!("xoxb-1234567890-{}", "AbC1".repeat(6)), "note": "\u{e9}"}).to_string();
    let body = serde_json::json!({"arguments": inner}).to_string();
    assert_eq!(
        found_as(body.as_bytes(), BodyFormat::Json),
        one("slack_token")
    );
    // An escaped escape: `\\u0041` is `\u0041` after one decoding.
    assert_eq!(
        found_as(br#"{"k":"\\u0041KIAIOSFODNN7EXAMPLE"}"#, BodyFormat::Json),
        one("aws_access_key_id")
    );
}

#[test]
fn form_encoded_secrets_are_found_and_form_stays_a_form() {
    let body = b"user=bob%40example.com&key=%41KIAIOSFODNN7EXAMPLE&card=4111+1111+1111+1111&x=1";
    let (out, f) = all().redact(body, BodyFormat::Form, &Literals::empty());
    assert_eq!(
        f.iter().collect::<Vec<_>>(),
        vec![("aws_access_key_id", 1), ("email", 1), ("payment_card", 1)]
    );
    assert_eq!(
        out,
        b"user=[REDACTED:email]&key=[REDACTED:aws_access_key_id]&card=[REDACTED:payment_card]&x=1"
    );
}

#[test]
fn percent_decoding_in_text_and_json_has_no_false_positives() {
    assert_eq!(found("50% off, 100%% sure, %zz, a%2Fb, 20%30%40"), vec![]);
    assert_eq!(
        found("https://x.test/?key=%41KIAIOSFODNN7EXAMPLE"),
        one("aws_access_key_id")
    );
    assert_eq!(
        found_as(b"{\"u\":\"https://x.test/a%20b?q=%2F\"}", BodyFormat::Json),
        vec![]
    );
}

#[test]
fn redacted_json_stays_json_and_loses_the_secret() {
    let secret = format!("sk-proj-{}", "Ab3dEf6hIj9kLm_-".repeat(8));
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "gpt-x",
        "messages": [
            {"role": "user", "content": format!("use \"{secret}\"\tplease, mail me at alice@example.com")},
            {"role": "user", "content": "card: 4111-1111-1111-1111 \u{1F600}"}
        ],
        "n": 4111111111111111u64
    }))
    .unwrap();
    let (out, f) = all().redact(&body, BodyFormat::Json, &Literals::empty());
    assert_eq!(f.get("openai_api_key"), 1);
    assert_eq!(f.get("email"), 1);
    assert_eq!(f.get("payment_card"), 2);
    assert_eq!(f.total(), 4);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        v["messages"][0]["content"],
        "use \"[REDACTED:openai_api_key]\"\tplease, mail me at [REDACTED:email]"
    );
    assert_eq!(v["n"], "[REDACTED:payment_card]");
    let text = String::from_utf8(out).unwrap();
    assert!(!text.contains(&secret) && !text.contains("4111"));
}

#[test]
fn redaction_widens_to_whole_escapes() {
    let body = br#"{"k":"\u0041KIAIOSFODNN7EXAMPL\u0045"}"#;
    let (out, _) = all().redact(body, BodyFormat::Json, &Literals::empty());
    assert_eq!(out, br#"{"k":"[REDACTED:aws_access_key_id]"}"#);
}

#[test]
fn secret_file_literals_in_every_form() {
    let value = b"s3cr3t-Passw0rd+with/odd=chars".to_vec();
    let lits = Literals::new([[value.clone(), b"\n".to_vec()].concat(), b"short".to_vec()]);
    let s = all();
    let check = |body: &[u8], format: BodyFormat, what: &str| {
        let f = s.scan(body, format, &lits);
        assert_eq!(
            f.get("secret_file"),
            1,
            "{what}: {}",
            String::from_utf8_lossy(body)
        );
    };
    check(
        &[b"pw: ", &value[..], b" end"].concat(),
        BodyFormat::Text,
        "raw",
    );
    for prefix in [&b""[..], b"x", b"xy"] {
        let enc = base64_std(&[prefix, &value[..], b"tail"].concat());
        check(&enc, BodyFormat::Text, "base64");
        let url = url_safe(&enc);
        check(&url, BodyFormat::Text, "base64url");
        // Base64 in JSON may have `\/` escapes.
        let json = [
            &b"{\"d\":\""[..],
            &String::from_utf8(enc)
                .unwrap()
                .replace('/', "\\/")
                .into_bytes(),
            b"\"}",
        ]
        .concat();
        check(&json, BodyFormat::Json, "base64 in json");
    }
    let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
    check(hex.as_bytes(), BodyFormat::Text, "hex");
    check(hex.to_uppercase().as_bytes(), BodyFormat::Text, "HEX");
    // A value with `+` and `/` also read raw when the form decoding would change it.
    check(
        &[b"a=", &value[..]].concat(),
        BodyFormat::Form,
        "raw in form",
    );
    // Found in a form too when percent-encoded.
    check(
        b"a=s3cr3t-Passw0rd%2Bwith%2Fodd%3Dchars",
        BodyFormat::Form,
        "percent-encoded",
    );
    // Only when the secrets set is on.
    let pii_only = Scanner::new(&[DetectorSet::Pii], &[]).unwrap();
    assert!(pii_only.scan(&value, BodyFormat::Text, &lits).is_empty());
    let (out, _) = s.redact(
        &[b"x ", &value[..], b" y"].concat(),
        BodyFormat::Text,
        &lits,
    );
    assert_eq!(out, b"x [REDACTED:secret_file] y");
}

#[test]
fn operator_patterns() {
    let s = Scanner::new(
        &[DetectorSet::Secrets],
        &[Pattern {
            name: "project-codename".into(),
            regex: r"(?i)\bblue[- ]falcon\b".into(),
        }],
    )
    .unwrap();
    let f = s.scan(
        "Project Blue-Falcon and blue falcon, not bluefalcon".as_bytes(),
        BodyFormat::Text,
        &Literals::empty(),
    );
    assert_eq!(f.iter().collect::<Vec<_>>(), vec![("project-codename", 2)]);
    assert!(s.detector_names().contains(&"project-codename"));
    assert!(s.detector_names().contains(&"secret_file"));
    assert!(!s.detector_names().contains(&"email"));
    let (out, _) = s.redact(
        b"{\"m\":\"blue falcon\"}",
        BodyFormat::Json,
        &Literals::empty(),
    );
    assert_eq!(out, b"{\"m\":\"[REDACTED:project-codename]\"}");
}

#[test]
fn pattern_errors() {
    let p = |name: &str, regex: &str| Pattern {
        name: name.into(),
        regex: regex.into(),
    };
    let err = Scanner::new(&[], &[p("broken", "a(b")]).unwrap_err();
    assert!(
        matches!(&err, DlpError::BadPattern { name, .. } if name == "broken"),
        "{err}"
    );
    assert!(err.to_string().contains("broken"));
    assert!(matches!(
        Scanner::new(&[], &[p("empty", "a*")]),
        Err(DlpError::BadPattern { .. })
    ));
    assert!(matches!(
        Scanner::new(&[], &[p("email", "x")]),
        Err(DlpError::ReservedName(_))
    ));
    assert!(matches!(
        Scanner::new(&[], &[p("secret_file", "x")]),
        Err(DlpError::ReservedName(_))
    ));
    assert!(matches!(
        Scanner::new(&[], &[p("a", "x"), p("a", "y")]),
        Err(DlpError::DuplicateName(_))
    ));
    assert!(matches!(
        Scanner::new(&[], &[p("", "x")]),
        Err(DlpError::EmptyName)
    ));
    assert!(matches!(
        Scanner::new(&[], &[p("a\"b", "x")]),
        Err(DlpError::BadName(_))
    ));
}

#[test]
fn detector_set_names() {
    assert_eq!(
        "secrets".parse::<DetectorSet>().unwrap(),
        DetectorSet::Secrets
    );
    assert_eq!("pii".parse::<DetectorSet>().unwrap(), DetectorSet::Pii);
    let err = "passwords".parse::<DetectorSet>().unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("passwords") && msg.contains("secrets") && msg.contains("pii"),
        "{msg}"
    );
}

#[test]
fn body_formats() {
    use BodyFormat::*;
    for (ct, f) in [
        (Some("application/json"), Json),
        (Some("Application/JSON; charset=utf-8"), Json),
        (Some("application/vnd.api+json"), Json),
        (Some("application/x-ndjson"), Json),
        (Some("text/event-stream"), Json),
        (Some("application/x-www-form-urlencoded"), Form),
        (Some("text/plain"), Text),
        (Some("multipart/form-data; boundary=x"), Text),
        (None, Text),
    ] {
        assert_eq!(BodyFormat::from_content_type(ct), f, "{ct:?}");
    }
}

#[test]
fn findings_api() {
    let mut a = Findings::default();
    assert!(a.is_empty() && a.first().is_none() && a.total() == 0);
    let b = all().scan(
        b"x@example.com AKIAIOSFODNN7EXAMPLE y@example.com",
        BodyFormat::Text,
        &Literals::empty(),
    );
    a.merge(&b);
    a.merge(&b);
    assert_eq!(
        a.iter().collect::<Vec<_>>(),
        vec![("aws_access_key_id", 2), ("email", 4)]
    );
    assert_eq!(a.first(), Some("aws_access_key_id"));
    assert_eq!(a.total(), 6);
}

fn scanner_is_send_sync<T: Send + Sync + Clone>() {}

#[test]
fn scanner_is_shareable() {
    scanner_is_send_sync::<Scanner>();
}

// ---- streams ----

/// A JSON body with every kind of finding, some escaped, between filler.
fn mixed_body() -> Vec<u8> {
    let mut content = String::new();
    for (i, (_, s)) in secrets().iter().enumerate() {
        content.push_str(&format!(
            "filler {i} lorem ipsum dolor sit amet, {s} consectetur. "
        ));
    }
    for (i, (_, s)) in pii().iter().enumerate() {
        content.push_str(&format!("more {i}: {s}; "));
    }
    content.push_str("literal s3cr3t-Passw0rd+with/odd=chars end");
    let mut body = serde_json::to_vec(
        &serde_json::json!({"messages": [{"role": "user", "content": content}]}),
    )
    .unwrap();
    body.extend_from_slice(
        br#"{"x":"\u0041KIAIOSFODNN7EXAMPLE","y":"\ud83d\ude00 4111111111111111"}"#,
    );
    body
}

fn literals() -> Arc<Literals> {
    Arc::new(Literals::new([b"s3cr3t-Passw0rd+with/odd=chars".to_vec()]))
}

fn run_stream(s: &Scanner, body: &[u8], chunk: usize, redact: bool) -> (Vec<u8>, Findings, usize) {
    let mut st = s.stream(BodyFormat::Json, literals(), redact);
    let mut out = Vec::new();
    let mut f = Findings::default();
    let mut max_held = 0;
    for c in body.chunks(chunk) {
        let (o, g) = st.push(c);
        out.extend(o);
        f.merge(&g);
        assert!(
            st.held_bytes() <= WINDOW + c.len(),
            "held {} with chunk {}",
            st.held_bytes(),
            c.len()
        );
        max_held = max_held.max(st.held_bytes());
    }
    let (o, g) = st.finish();
    out.extend(o);
    f.merge(&g);
    (out, f, max_held)
}

#[test]
fn stream_matches_whole_body_scan_for_any_chunk_size() {
    let s = all();
    let body = mixed_body();
    let lits = literals();
    let expected = s.scan(&body, BodyFormat::Json, &lits);
    let (expected_redacted, _) = s.redact(&body, BodyFormat::Json, &lits);
    assert!(expected.total() >= 30, "{expected:?}");
    let sizes: Vec<usize> = (1..=64).chain([100, 1000, 4096, 5000, 100_000]).collect();
    for chunk in sizes {
        let (out, f, _) = run_stream(&s, &body, chunk, false);
        assert_eq!(f, expected, "pass-through, chunk {chunk}");
        assert!(out == body, "pass-through output differs, chunk {chunk}");
        let (out, f, _) = run_stream(&s, &body, chunk, true);
        assert_eq!(f, expected, "redacting, chunk {chunk}");
        assert!(
            out == expected_redacted,
            "redacted output differs, chunk {chunk}:\n{}\n{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&expected_redacted)
        );
    }
}

#[test]
fn match_split_across_chunks_is_found_once_and_redacted() {
    let s = all();
    let body = format!("aaa {AWS} bbb");
    for split in 1..body.len() {
        for redact in [false, true] {
            let mut st = s.stream(BodyFormat::Text, Arc::new(Literals::empty()), redact);
            let (mut out, mut f) = st.push(&body.as_bytes()[..split]);
            let (o, g) = st.push(&body.as_bytes()[split..]);
            out.extend(o);
            f.merge(&g);
            let (o, g) = st.finish();
            out.extend(o);
            f.merge(&g);
            assert_eq!(
                f.iter().collect::<Vec<_>>(),
                vec![("aws_access_key_id", 1)],
                "split {split}"
            );
            if redact {
                assert_eq!(
                    out, b"aaa [REDACTED:aws_access_key_id] bbb",
                    "split {split}"
                );
            } else {
                assert_eq!(out, body.as_bytes());
            }
        }
    }
}

#[test]
fn stream_memory_is_bounded() {
    let s = all();
    // 4 MiB of prose with a secret every 64 KiB.
    let mut body = Vec::new();
    let mut i = 0;
    while body.len() < 4 << 20 {
        body.extend_from_slice(b"The quick brown fox jumps over the lazy dog; ");
        i += 1;
        if i % 1400 == 0 {
            body.extend_from_slice(format!("{AWS} ").as_bytes());
        }
    }
    let expected = s.scan(&body, BodyFormat::Text, &Literals::empty());
    for redact in [false, true] {
        let mut st = s.stream(BodyFormat::Text, Arc::new(Literals::empty()), redact);
        let mut f = Findings::default();
        let mut out_len = 0;
        for c in body.chunks(1024) {
            let (o, g) = st.push(c);
            out_len += o.len();
            f.merge(&g);
            assert!(
                st.held_bytes() <= WINDOW + c.len(),
                "held {}",
                st.held_bytes()
            );
        }
        let (o, g) = st.finish();
        out_len += o.len();
        f.merge(&g);
        assert_eq!(f, expected);
        if !redact {
            assert_eq!(out_len, body.len());
        }
    }
    // A run of token characters longer than the window is given up on
    // rather than held.
    let long = [b"x sk-".as_slice(), &b"aB3".repeat(30_000)].concat();
    let mut st = s.stream(BodyFormat::Text, Arc::new(Literals::empty()), false);
    for c in long.chunks(1024) {
        st.push(c);
        assert!(st.held_bytes() <= WINDOW + c.len());
    }
}

#[test]
fn large_pem_block_is_redacted_while_streaming() {
    let s = all();
    let key = pem("RSA PRIVATE KEY", 40 * 1024 / 65);
    assert!(key.len() > 40 * 1024);
    let body = serde_json::to_vec(
        &serde_json::json!({"content": format!("key:\n{key}\nafter AKIAIOSFODNN7EXAMPLE")}),
    )
    .unwrap();
    for chunk in [1, 7, 1024, 3000, 100_000] {
        let (out, f, max_held) = run_stream(&s, &body, chunk, true);
        assert_eq!(
            f.iter().collect::<Vec<_>>(),
            vec![("aws_access_key_id", 1), ("private_key", 1)],
            "chunk {chunk}"
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["content"], "key:\n[REDACTED:private_key]\nafter [REDACTED:aws_access_key_id]",
            "chunk {chunk}"
        );
        assert!(max_held <= WINDOW + chunk);
    }
    // Cut off mid-block: everything after the header is withheld.
    let cut = &body[..body.len() / 2];
    let (out, f, _) = run_stream(&s, cut, 1024, true);
    assert_eq!(f.get("private_key"), 1);
    assert_eq!(out, br#"{"content":"key:\n[REDACTED:private_key]"#);
}

#[test]
fn stream_scanner_is_send() {
    fn send<T: Send>() {}
    send::<StreamScanner>();
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Arbitrary chunkings give the whole-body findings and output.
        #[test]
        fn any_chunking_agrees_with_whole_body(cuts in proptest::collection::vec(1usize..400, 1..200), redact: bool) {
            let s = all();
            let body = mixed_body();
            let lits = literals();
            let expected = s.scan(&body, BodyFormat::Json, &lits);
            let expected_out = if redact { s.redact(&body, BodyFormat::Json, &lits).0 } else { body.clone() };
            let mut st = s.stream(BodyFormat::Json, Arc::clone(&lits), redact);
            let (mut out, mut f) = (Vec::new(), Findings::default());
            let mut rest = &body[..];
            for cut in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (c, r) = rest.split_at((*cut).min(rest.len()));
                rest = r;
                let (o, g) = st.push(c);
                out.extend(o);
                f.merge(&g);
            }
            let (o, g) = st.finish();
            out.extend(o);
            f.merge(&g);
            prop_assert_eq!(f, expected);
            prop_assert!(out == expected_out);
        }
    }
}
