//! Writes the seed corpora under `fuzz/corpus/<target>/` with thaw's real encoders (and
//! the examples of docs/FORMAT.md). Run from the repository root after `cargo fuzz build`:
//! `fuzz/target/<triple>/release/gen_corpus [DIR]` (DIR defaults to `fuzz/corpus`).
//! Seeds carry the mode byte each target reads first.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use thaw_schema::batch::BatchWriter;
use thaw_schema::chunker::ChunkerParams;
use thaw_schema::dto::{encode_chunk_id_query, encode_missing_answer};
use thaw_schema::frame::EncodedChunk;
use thaw_schema::manifest::{snapshot_manifest, SnapshotFile};
use thaw_schema::media::{self, FileRole};
use thaw_schema::recipe::RecipeBuilder;
use thaw_schema::working_set::WorkingSet;
use thaw_schema::{ChunkId, Sha256Digest};

fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join(name), bytes).unwrap();
}

fn with_mode(mode: u8, rest: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(rest);
    v
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/corpus".into()));

    // recipe_decode: mode 0 = whole recipe; mode 1 = body without its trailer.
    let mut b = RecipeBuilder::new(ChunkerParams::fixed(4096));
    b.push_data(4096, ChunkId::of(b"a"));
    b.push_zero(4096);
    b.push_data(100, ChunkId::of(b"b"));
    let fixed = b.finish(Sha256Digest::of(b"blob")).encode();
    let mut b = RecipeBuilder::new(ChunkerParams::REGISTRY_DEFAULT);
    b.push_data(70_000, ChunkId::of(b"c"));
    b.push_data(20_000, ChunkId::of(b"c"));
    b.push_zero(16_384);
    let cdc = b.finish(Sha256Digest::of(b"cdc")).encode();
    let empty = RecipeBuilder::new(ChunkerParams::fixed(4096)).finish(Sha256Digest::of(b"")).encode();
    for (name, r) in [("fixed", &fixed), ("fastcdc", &cdc), ("empty", &empty)] {
        put(&dir, "recipe_decode", &format!("{name}-whole"), &with_mode(0, r));
        put(&dir, "recipe_decode", &format!("{name}-body"), &with_mode(1, &r[..r.len() - 32]));
    }

    // working_set_decode: the example of docs/FORMAT.md, and an empty list.
    let example = WorkingSet { memory: Sha256Digest::of(b"memory"), entry_count: 4, order: vec![3, 0] };
    put(&dir, "working_set_decode", "example", &example.encode());
    put(&dir, "working_set_decode", "empty", &WorkingSet { order: Vec::new(), ..example }.encode());

    // chunk_batch: mode 0 = batch, mode 1 = frame.
    let text = b"thaw thaw thaw thaw thaw thaw thaw thaw".repeat(20);
    let noise: Vec<u8> = (0..300u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let z = EncodedChunk::compress(&text, 1);
    let raw = EncodedChunk::compress(&noise, 1);
    let mut w = BatchWriter::new();
    w.push(&ChunkId::of(&text), &z);
    w.push(&ChunkId::of(&noise), &raw);
    put(&dir, "chunk_batch", "batch-two", &with_mode(0, &w.finish()));
    put(&dir, "chunk_batch", "batch-empty", &with_mode(0, BatchWriter::new().finish().as_slice()));
    put(&dir, "chunk_batch", "frame-zstd", &with_mode(1, &z.to_frame()));
    put(&dir, "chunk_batch", "frame-raw", &with_mode(1, &raw.to_frame()));

    // missing_query: mode 0 = query, 1 = answer, 2.. = flags.
    let ids: Vec<ChunkId> = (0..3u64).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
    put(&dir, "missing_query", "query-3", &with_mode(0, &encode_chunk_id_query(&ids)));
    put(&dir, "missing_query", "query-0", &with_mode(0, &encode_chunk_id_query(&[])));
    let mut nine = vec![false; 9];
    nine[1] = true;
    nine[8] = true;
    put(&dir, "missing_query", "answer-bitmap-format-md", &with_mode(1, &encode_missing_answer(&nine)));
    let mut thousand = vec![false; 1000];
    thousand[700] = true;
    put(&dir, "missing_query", "answer-positions", &with_mode(1, &encode_missing_answer(&thousand)));
    put(&dir, "missing_query", "answer-empty", &with_mode(1, &encode_missing_answer(&[])));
    put(&dir, "missing_query", "flags", &[3, 0x81, 0x00, 0xff, 0x10]);

    // manifest_parse: first byte = Content-Type index (0 none, 1 OCI manifest, 2 OCI index).
    let files: Vec<SnapshotFile> = FileRole::ALL
        .iter()
        .map(|&role| SnapshotFile {
            role,
            title: format!("{role:?}").to_lowercase(),
            digest: Sha256Digest::of(role.media_type().as_bytes()),
            size: 4096,
            recipe: Some(Sha256Digest::of(format!("recipe of {role:?}").as_bytes())),
        })
        .collect();
    let m = snapshot_manifest(Sha256Digest::of(b"{}"), 2, &files, HashMap::new()).unwrap();
    let body = serde_json::to_vec(&m).unwrap();
    put(&dir, "manifest_parse", "snapshot", &with_mode(1, &body));
    put(&dir, "manifest_parse", "snapshot-no-ct", &with_mode(0, &body));
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": [{"mediaType": media::OCI_MANIFEST, "digest": Sha256Digest::of(&body).to_string(),
                       "size": body.len()}],
        "subject": {"mediaType": media::OCI_MANIFEST, "digest": Sha256Digest::of(b"s").to_string(), "size": 1},
    });
    put(&dir, "manifest_parse", "index", &with_mode(2, &serde_json::to_vec(&index).unwrap()));
    let docker = serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": Sha256Digest::of(b"c").to_string(), "size": 10},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "digest": Sha256Digest::of(b"l").to_string(), "size": 20,
                    "annotations": {(media::ANNOTATION_TITLE): "../etc/passwd"}}],
    });
    put(&dir, "manifest_parse", "docker-unsafe-title", &with_mode(3, &serde_json::to_vec(&docker).unwrap()));

    // repo_name: candidate names.
    for (i, s) in [
        "library/ubuntu",
        "a.b_c__d---e/f0",
        "functions/hello-world",
        "a/../b",
        "node-1.example",
        "v1.0-rc_1",
    ]
    .iter()
    .enumerate()
    {
        put(&dir, "repo_name", &format!("name-{i}"), s.as_bytes());
    }

    // registry_routing: paths from docs/API.md.
    let d = Sha256Digest::of(b"x");
    for (i, p) in [
        "/v2/".to_owned(),
        "/v2/_catalog".to_owned(),
        "/v2/_oci/ext/discover".to_owned(),
        "/v2/_thaw/nodes/node-1.example".to_owned(),
        "/v2/a/b/manifests/latest".to_owned(),
        format!("/v2/fn/hello/blobs/{d}"),
        "/v2/fn/blobs/uploads/".to_owned(),
        "/v2/fn/blobs/uploads/0123abcd".to_owned(),
        "/v2/a/b/c/tags/list".to_owned(),
        format!("/v2/fn/referrers/{d}"),
        "/v2/fn/_thaw/chunks/missing".to_owned(),
        "/v2/fn/_thaw/chunks".to_owned(),
        "/v2/fn/_thaw/chunks/fetch".to_owned(),
        format!("/v2/fn/_thaw/blobs/{d}"),
        format!("/v2/fn/_thaw/blobs/sha256%3A{}/recipe", d.hex()),
        "/v2/a/%2e%2e/manifests/x".to_owned(),
    ]
    .iter()
    .enumerate()
    {
        put(&dir, "registry_routing", &format!("path-{i:02}"), p.as_bytes());
    }

    // auth_token: mode 0 = a token; 1 = a claims payload the target signs; 2 = user and
    // scopes, one a line.
    let far = 4_102_444_800u64; // 2100-01-01
    let claims = format!(
        r#"{{"sub":"a","aud":"thaw-fuzz","iat":1,"exp":{far},"access":[{{"type":"repository","name":"team-a/app","actions":["pull","push"]}},{{"type":"registry","name":"nodes","actions":["read"]}}]}}"#
    );
    let wrong_service = format!(r#"{{"sub":"","aud":"other","iat":1,"exp":{far},"access":[]}}"#);
    for (i, seed) in [
        with_mode(0, b"eyJzdWIiOiJhIn0.c2ln"),
        with_mode(0, b"no-dot"),
        with_mode(1, claims.as_bytes()),
        with_mode(1, wrong_service.as_bytes()),
        with_mode(1, br#"{"sub":"a","aud":"thaw-fuzz","iat":1,"exp":2,"access":[]}"#),
        with_mode(2, b"a\nrepository:team-a/app:pull,push\nrepository:team-b/app:pull"),
        with_mode(2, b"\nrepository:public/x:pull registry:catalog:*"),
        with_mode(2, b"node\nregistry:nodes:read,write"),
        with_mode(2, b"root\nregistry:catalog:*\nrepository:team-*:delete"),
    ]
    .iter()
    .enumerate()
    {
        put(&dir, "auth_token", &format!("seed-{i}"), seed);
    }

    // authorization_header: header values as clients send them.
    for (i, v) in [
        "Basic dXNlci1hOmEtcGFzc3dvcmQ=",
        "basic dTpwOnE=",
        "Bearer eyJzdWIiOiJhIn0.c2ln",
        "bearer   tok  ",
        "Basic !!!",
        "Basic dXNlcg==",
        "Digest username=\"x\"",
        "Bearer",
    ]
    .iter()
    .enumerate()
    {
        put(&dir, "authorization_header", &format!("value-{i}"), v.as_bytes());
    }

    // route_scope: method byte (index into GET HEAD PUT POST PATCH DELETE OPTIONS), then a
    // path and query from docs/API.md, the mount tricks of issue 18 included.
    for (i, (method, target)) in [
        (3u8, format!("/v2/team-a/app/blobs/uploads/?mount={d}&from=team-b/app")),
        (3, format!("/v2/team-a/app/blobs/uploads/?mount={d}&from=team-a/lib&from=team-b/app")),
        (3, format!("/v2/team-a/app/blobs/uploads/?%6Dount={d}&%66rom=team-b%2Fapp")),
        (3, format!("/v2/team-a/app/blobs/uploads/?digest={d}")),
        (2, format!("/v2/team-a/app/blobs/uploads/0123abcd?digest={d}")),
        (0, "/v2/team-a/app/tags/list?n=10&last=v1".to_owned()),
        (0, "/v2/_catalog?n=1".to_owned()),
        (0, format!("/v2/team-a/app/referrers/{d}?artifactType=application%2Fvnd.example")),
        (5, format!("/v2/team-a/app/manifests/{d}")),
        (2, "/v2/team-a/app/manifests/v1".to_owned()),
        (3, "/v2/team-a/app/_thaw/chunks/fetch".to_owned()),
        (3, "/v2/team-a/app/_thaw/chunks/missing".to_owned()),
        (2, format!("/v2/team-a/app/_thaw/blobs/{d}")),
        (2, "/v2/_thaw/nodes/node-1".to_owned()),
        (0, "/v2/".to_owned()),
    ]
    .iter()
    .enumerate()
    {
        put(&dir, "route_scope", &format!("request-{i:02}"), &with_mode(*method, target.as_bytes()));
    }

    // extender_request: ExtenderArgs as kube-scheduler sends them.
    let annotated = serde_json::json!({
        "Pod": {"metadata": {"name": "p", "namespace": "ns",
                "annotations": {"thaw.dev/snapshot": format!("reg.local:5000/fn/hello:v1@{d}")}}},
        "NodeNames": ["node-a", "node-b"],
    });
    let knative = serde_json::json!({
        "pod": {"metadata": {"namespace": "team-a", "labels": {
            "serving.knative.dev/revision": "hello-00003", "serving.knative.dev/service": "hello"}}},
        "nodes": {"items": [{"metadata": {"name": "node-a"}}, {"metadata": {"name": "node-b"}}]},
    });
    put(&dir, "extender_request", "annotated", &serde_json::to_vec(&annotated).unwrap());
    put(&dir, "extender_request", "knative-nodes", &serde_json::to_vec(&knative).unwrap());
    put(&dir, "extender_request", "empty", b"{}");
}
