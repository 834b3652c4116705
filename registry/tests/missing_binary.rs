//! The binary form of `POST /v2/<name>/_thaw/chunks/missing` (docs/FORMAT.md,
//! "Missing-chunks query"), black-box: queries and answers are built and read by hand from
//! the format description, both answer forms are checked byte for byte against the JSON
//! form's answer, and bad queries are refused. Runs on S3 too (`THAW_TEST_STORAGE=s3`).

mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const IDS_TYPE: &str = "application/vnd.thaw.chunk-ids.v1";
const ANSWER_TYPE: &str = "application/vnd.thaw.missing-chunks.v1";
const MAX_IDS: usize = 100_000;

fn query(ids: &[[u8; 32]]) -> Vec<u8> {
    let mut out = b"THAWIDS\x01".to_vec();
    for id in ids {
        out.extend_from_slice(id);
    }
    out
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Reads an answer per FORMAT.md: returns (form byte, one flag per id, true = missing).
fn read_answer(body: &[u8], asked: usize) -> (u8, Vec<bool>) {
    assert_eq!(&body[..8], b"THAWMIS\x01", "answer magic");
    assert_eq!(u32_at(body, 8) as usize, asked, "answer count");
    let form = body[12];
    let rest = &body[13..];
    let flags = match form {
        0 => {
            assert_eq!(rest.len(), asked.div_ceil(8), "bitmap length");
            (0..asked).map(|i| rest[i / 8] & (1 << (i % 8)) != 0).collect()
        }
        1 => {
            let m = u32_at(rest, 0) as usize;
            assert_eq!(rest.len(), 4 + 4 * m, "position list length");
            let mut flags = vec![false; asked];
            let mut last = None;
            for k in 0..m {
                let p = u32_at(rest, 4 + 4 * k) as usize;
                assert!(last.is_none_or(|l| p > l) && p < asked, "positions ascend within the query");
                flags[p] = true;
                last = Some(p);
            }
            flags
        }
        other => panic!("unknown answer form {other}"),
    };
    (form, flags)
}

async fn ask(r: &TestRegistry, name: &str, content_type: &str, body: Vec<u8>) -> reqwest::Response {
    r.req(Method::POST, &format!("/v2/{name}/_thaw/chunks/missing"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("POST chunks/missing")
}

async fn ask_binary(r: &TestRegistry, name: &str, ids: &[[u8; 32]]) -> (u8, Vec<bool>, usize) {
    let resp = ask(r, name, IDS_TYPE, query(ids)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(resp.headers(), "content-type").as_deref(), Some(ANSWER_TYPE));
    let body = resp.bytes().await.unwrap();
    let (form, flags) = read_answer(&body, ids.len());
    (form, flags, body.len())
}

async fn ask_json(r: &TestRegistry, name: &str, ids: &[[u8; 32]]) -> Vec<bool> {
    let hex: Vec<String> = ids.iter().map(hex::encode).collect();
    let resp = r
        .req(Method::POST, &format!("/v2/{name}/_thaw/chunks/missing"))
        .json(&json!({ "chunks": hex }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    let missing: Vec<&str> = v["missing"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    hex.iter().map(|h| missing.contains(&h.as_str())).collect()
}

/// Stores `n` distinct small chunks through `_thaw/chunks`; returns their ids.
async fn store_chunks(r: &TestRegistry, name: &str, seed: u64, n: usize) -> Vec<[u8; 32]> {
    let mut rng = Rng::new(seed);
    let entries: Vec<BatchEntry> = (0..n).map(|_| encode_chunk(&rng.bytes(512))).collect();
    let resp = r
        .req(Method::POST, &format!("/v2/{name}/_thaw/chunks"))
        .header("content-type", CHUNKS_TYPE)
        .body(chunk_batch(&entries))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", body_text(resp).await);
    entries.iter().map(|e| e.id).collect()
}

fn unknown_ids(seed: u64, n: usize) -> Vec<[u8; 32]> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| chunk_id(&rng.bytes(64))).collect()
}

#[tokio::test]
async fn binary_answers_agree_with_json_in_the_shorter_form() {
    let r = TestRegistry::start().await;
    let stored = store_chunks(&r, "bin/ok", 1, 40).await;
    let unknown = unknown_ids(2, 1000);

    // Mostly stored, a few missing: the position list is shorter than the bitmap. A
    // repeated id is answered each time.
    let mut ids: Vec<[u8; 32]> = (0..1000).map(|i| stored[i % stored.len()]).collect();
    let mut want = vec![false; 1000];
    for (k, at) in [0usize, 500, 999].into_iter().enumerate() {
        ids[at] = unknown[k];
        want[at] = true;
    }
    let (form, flags, len) = ask_binary(&r, "bin/ok", &ids).await;
    assert_eq!(flags, want);
    assert_eq!(ask_json(&r, "bin/ok", &ids).await, want, "JSON form agrees");
    assert_eq!((form, len), (1, 13 + 4 + 3 * 4), "1000 ids, 3 missing: positions");
    // 34 ids, 3 missing: the bitmap (5 bytes) beats the positions (16).
    let (form, flags, len) = ask_binary(&r, "bin/ok", &ids[..34]).await;
    assert_eq!(flags, want[..34]);
    assert_eq!((form, len), (0, 13 + 5));

    // Everything missing: the bitmap.
    let (form, flags, len) = ask_binary(&r, "bin/ok", &unknown).await;
    assert_eq!(flags, vec![true; 1000]);
    assert_eq!((form, len), (0, 13 + 125), "1000 ids, all missing: bitmap");

    // Half missing, interleaved, an id count that is not a multiple of 8.
    let ids: Vec<[u8; 32]> = stored.iter().zip(&unknown).flat_map(|(s, u)| [*s, *u]).take(75).collect();
    let want: Vec<bool> = (0..75).map(|i| i % 2 == 1).collect();
    let (form, flags, len) = ask_binary(&r, "bin/ok", &ids).await;
    assert_eq!(flags, want);
    assert_eq!(ask_json(&r, "bin/ok", &ids).await, want);
    assert_eq!((form, len), (0, 13 + 10));

    // Nothing asked, nothing missing.
    let (form, flags, len) = ask_binary(&r, "bin/ok", &[]).await;
    assert!(flags.is_empty());
    assert_eq!((form, len), (0, 13));
    // Content-Type parameters and case do not matter.
    let resp = ask(&r, "bin/ok", "Application/VND.thaw.chunk-ids.v1; charset=binary", query(&stored)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(read_answer(&resp.bytes().await.unwrap(), 40).1, vec![false; 40]);
}

#[tokio::test]
async fn the_id_limit_is_the_json_limit() {
    let r = TestRegistry::start().await;
    let stored = store_chunks(&r, "bin/limit", 3, 1).await;
    let mut ids = vec![[7u8; 32]; MAX_IDS];
    ids[MAX_IDS - 1] = stored[0];
    let (_, flags, _) = ask_binary(&r, "bin/limit", &ids).await;
    assert_eq!(flags.iter().filter(|m| **m).count(), MAX_IDS - 1, "100,000 ids are answered");
    assert!(!flags[MAX_IDS - 1]);
    ids.push([8u8; 32]);
    let resp = ask(&r, "bin/limit", IDS_TYPE, query(&ids)).await;
    expect_error(resp, 400, &["SIZE_INVALID"], "100,001 ids").await;
    // A body past the query size limit (8 MiB) is refused by its declared length, before
    // the server reads it.
    let huge = query(&vec![[9u8; 32]; 300_000]);
    let head = format!(
        "POST /v2/bin/limit/_thaw/chunks/missing HTTP/1.1\r\nHost: {}\r\nContent-Type: {IDS_TYPE}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.addr(),
        huge.len()
    );
    let (status, text) = raw_http_early(r.addr(), &head, &huge).await.expect("an answer");
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("SIZE_INVALID"), "{text}");
}

#[tokio::test]
async fn malformed_queries_are_refused() {
    let r = TestRegistry::start().await;
    let ids = unknown_ids(4, 3);
    let good = query(&ids);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("one byte short", good[..good.len() - 1].to_vec()),
        ("one byte over", [&good[..], &[0]].concat()),
        ("half an id", good[..8 + 16].to_vec()),
        ("no magic", good[8..].to_vec()),
        ("wrong version", [&b"THAWIDS\x02"[..], &good[8..]].concat()),
        ("empty body", Vec::new()),
        ("JSON in a binary body", br#"{"chunks":[]}"#.to_vec()),
    ];
    for (what, body) in cases {
        expect_error(ask(&r, "bin/bad", IDS_TYPE, body).await, 400, &["UNSUPPORTED"], what).await;
    }
    // Types that are neither form.
    for wrong in [
        "application/octet-stream",
        "text/plain",
        "application/vnd.thaw.chunks.v1",
        "application/vnd.thaw.chunk-ids.v2",
    ] {
        expect_error(ask(&r, "bin/bad", wrong, good.clone()).await, 415, &["UNSUPPORTED"], wrong).await;
    }
    // JSON sent as binary, and binary sent as JSON.
    let hex: Vec<String> = ids.iter().map(hex::encode).collect();
    let json_body = serde_json::to_vec(&json!({ "chunks": hex })).unwrap();
    expect_error(ask(&r, "bin/bad", IDS_TYPE, json_body).await, 400, &["UNSUPPORTED"], "JSON as binary")
        .await;
    expect_error(ask(&r, "bin/bad", "application/json", good).await, 400, &["UNSUPPORTED"], "binary as JSON")
        .await;
    // A bad repository name is refused before the body is looked at.
    let resp = ask(&r, "Bad", IDS_TYPE, query(&ids)).await;
    expect_error(resp, 400, &["NAME_INVALID"], "bad name").await;
}
