//! Fault injection: an `ObjectStore` wrapper ([`Faulty`]) that fails, delays, stalls or
//! corrupts chosen calls to the store under it, as its [`Faults`] rules say.
//!
//! Tests hand a [`Faults`] to the registry (`ServeOptions::with_faults`), which then wraps
//! its real backend in [`Faulty`]; rules can be added and removed while requests run. A
//! rule picks calls by kind ([`Op`]) and key prefix, then fires on the Nth matching call,
//! on every one, or with a probability drawn from a seeded generator (so a failing run can
//! be repeated). Injected failures are `object_store::Error::Generic`, what a broken
//! backend returns; corruption flips one byte in the middle of a GET's answer.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

/// A kind of store call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `put`, `put_opts` and the start of a multipart upload.
    Put,
    /// A GET of a whole object.
    Get,
    /// A GET of a byte range (`get_range`, or `get_opts` with a range).
    GetRange,
    /// Any listing.
    List,
    /// `delete`.
    Delete,
    /// `head`, or `get_opts` with `head` set.
    Head,
}

/// What a rule does to a call it fires on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The call fails with a backend error and does nothing.
    Fail,
    /// The call waits this long, then goes through.
    Delay(Duration),
    /// The call waits until [`Faults::release_stalls`], then goes through.
    Stall,
    /// A GET (whole or range) answers with one byte flipped; other calls go through.
    Corrupt,
}

/// Which matching calls a rule fires on.
#[derive(Debug, Clone, Copy, PartialEq)]
enum When {
    Always,
    /// The Nth matching call (1-based), once.
    Nth(u64),
    Probability(f64),
}

/// One rule: which calls, when, and what happens.
#[derive(Debug, Clone)]
pub struct Rule {
    op: Option<Op>,
    prefix: Option<String>,
    when: When,
    fault: Fault,
}

impl Rule {
    /// `fault` on every call of kind `op` (narrow it with [`Rule::under`], [`Rule::nth`],
    /// [`Rule::with_probability`]).
    pub fn on(op: Op, fault: Fault) -> Self {
        Self { op: Some(op), prefix: None, when: When::Always, fault }
    }
    /// `fault` on every call of any kind.
    pub fn any(fault: Fault) -> Self {
        Self { op: None, prefix: None, when: When::Always, fault }
    }
    /// Only calls on keys starting with `prefix` (a listing matches by its prefix).
    pub fn under(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }
    /// Only the `n`th matching call (1-based), once.
    pub fn nth(mut self, n: u64) -> Self {
        self.when = When::Nth(n.max(1));
        self
    }
    /// Each matching call with probability `p`, from the [`Faults`] seeded generator.
    pub fn with_probability(mut self, p: f64) -> Self {
        self.when = When::Probability(p.clamp(0.0, 1.0));
        self
    }

    fn matches(&self, op: Op, key: &str) -> bool {
        self.op.is_none_or(|o| o == op) && self.prefix.as_deref().is_none_or(|p| key.starts_with(p))
    }
}

/// Identifies an added rule, to remove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleId(u64);

#[derive(Debug)]
struct Active {
    id: RuleId,
    rule: Rule,
    seen: u64,
}

#[derive(Debug)]
struct Rules {
    active: Vec<Active>,
    next_id: u64,
    /// splitmix64 state.
    rng: u64,
}

/// The programmable part: rules, a seeded generator, and counts of what was injected.
#[derive(Debug)]
pub struct Faults {
    rules: Mutex<Rules>,
    injected: AtomicU64,
    stalled: AtomicU64,
    release: tokio::sync::Semaphore,
}

impl Faults {
    /// No rules yet; `seed` drives [`Rule::with_probability`].
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Self {
            rules: Mutex::new(Rules { active: Vec::new(), next_id: 0, rng: seed }),
            injected: AtomicU64::new(0),
            stalled: AtomicU64::new(0),
            release: tokio::sync::Semaphore::new(0),
        })
    }

    /// Adds a rule; calls are checked against rules in the order they were added and the
    /// first that fires decides.
    pub fn add(&self, rule: Rule) -> RuleId {
        let mut rules = self.rules.lock().expect("fault rules lock");
        let id = RuleId(rules.next_id);
        rules.next_id += 1;
        rules.active.push(Active { id, rule, seen: 0 });
        id
    }

    /// Removes a rule (calls already delayed or stalled by it stay so).
    pub fn remove(&self, id: RuleId) {
        self.rules.lock().expect("fault rules lock").active.retain(|a| a.id != id);
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.rules.lock().expect("fault rules lock").active.clear();
    }

    /// How many calls a rule fired on so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// How many calls are waiting in a [`Fault::Stall`] right now.
    pub fn stalled(&self) -> u64 {
        self.stalled.load(Ordering::SeqCst)
    }

    /// Lets every stalled call go on, and makes later stalls pass at once.
    pub fn release_stalls(&self) {
        self.release.close();
    }

    /// The fault for one call, if a rule fires on it.
    fn decide(&self, op: Op, key: &str) -> Option<Fault> {
        let mut rules = self.rules.lock().expect("fault rules lock");
        let Rules { active, rng, .. } = &mut *rules;
        let mut fired = None;
        for a in active.iter_mut() {
            if !a.rule.matches(op, key) {
                continue;
            }
            a.seen += 1;
            let fires = match a.rule.when {
                When::Always => true,
                When::Nth(n) => a.seen == n,
                When::Probability(p) => ((splitmix64(rng) >> 11) as f64 / (1u64 << 53) as f64) < p,
            };
            if fires {
                fired = Some(a.rule.fault);
                break;
            }
        }
        if fired.is_some() {
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
        fired
    }

    /// Applies the waiting faults; returns the fault left for the caller (fail or corrupt).
    async fn before(&self, op: Op, key: &str) -> Option<Fault> {
        match self.decide(op, key)? {
            Fault::Delay(d) => {
                tokio::time::sleep(d).await;
                None
            }
            Fault::Stall => {
                self.stalled.fetch_add(1, Ordering::SeqCst);
                // Closed by `release_stalls`; no permit is ever added.
                let _ = self.release.acquire().await;
                self.stalled.fetch_sub(1, Ordering::SeqCst);
                None
            }
            other => Some(other),
        }
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn injected_error(op: Op, key: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "fault injection",
        source: format!("injected failure of {op:?} on {key}").into(),
    }
}

/// Flips the middle byte (no-op on an empty answer).
fn flip(bytes: Bytes) -> Bytes {
    if bytes.is_empty() {
        return bytes;
    }
    let mut b = BytesMut::from(bytes.as_ref());
    let mid = b.len() / 2;
    b[mid] ^= 0x5A;
    b.freeze()
}

/// An object store that injects the faults its [`Faults`] rules call for into calls to
/// `inner`.
#[derive(Debug)]
pub struct Faulty {
    inner: Arc<dyn ObjectStore>,
    faults: Arc<Faults>,
}

impl Faulty {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, faults: Arc<Faults>) -> Self {
        Self { inner, faults }
    }
}

impl std::fmt::Display for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

/// A listing whose first item waits for (or is) the fault.
fn faulty_list(
    faults: Arc<Faults>,
    key: String,
    inner: BoxStream<'static, Result<ObjectMeta>>,
) -> BoxStream<'static, Result<ObjectMeta>> {
    futures::stream::once(async move {
        match faults.before(Op::List, &key).await {
            Some(Fault::Fail) => {
                futures::stream::once(async move { Err(injected_error(Op::List, &key)) }).boxed()
            }
            _ => inner,
        }
    })
    .flatten()
    .boxed()
}

#[async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        if self.faults.before(Op::Put, location.as_ref()).await == Some(Fault::Fail) {
            return Err(injected_error(Op::Put, location.as_ref()));
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        if self.faults.before(Op::Put, location.as_ref()).await == Some(Fault::Fail) {
            return Err(injected_error(Op::Put, location.as_ref()));
        }
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let op = if options.head {
            Op::Head
        } else if options.range.is_some() {
            Op::GetRange
        } else {
            Op::Get
        };
        match self.faults.before(op, location.as_ref()).await {
            Some(Fault::Fail) => Err(injected_error(op, location.as_ref())),
            Some(Fault::Corrupt) if op != Op::Head => {
                let result = self.inner.get_opts(location, options).await?;
                let (meta, range, attributes) =
                    (result.meta.clone(), result.range.clone(), result.attributes.clone());
                let bytes = flip(result.bytes().await?);
                let payload =
                    GetResultPayload::Stream(futures::stream::once(async move { Ok(bytes) }).boxed());
                Ok(GetResult { payload, meta, range, attributes })
            }
            _ => self.inner.get_opts(location, options).await,
        }
    }

    async fn get_range(&self, location: &Path, range: Range<u64>) -> Result<Bytes> {
        match self.faults.before(Op::GetRange, location.as_ref()).await {
            Some(Fault::Fail) => Err(injected_error(Op::GetRange, location.as_ref())),
            Some(Fault::Corrupt) => Ok(flip(self.inner.get_range(location, range).await?)),
            _ => self.inner.get_range(location, range).await,
        }
    }

    async fn head(&self, location: &Path) -> Result<ObjectMeta> {
        if self.faults.before(Op::Head, location.as_ref()).await == Some(Fault::Fail) {
            return Err(injected_error(Op::Head, location.as_ref()));
        }
        self.inner.head(location).await
    }

    async fn delete(&self, location: &Path) -> Result<()> {
        if self.faults.before(Op::Delete, location.as_ref()).await == Some(Fault::Fail) {
            return Err(injected_error(Op::Delete, location.as_ref()));
        }
        self.inner.delete(location).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let key = prefix.map(|p| p.to_string()).unwrap_or_default();
        faulty_list(self.faults.clone(), key, self.inner.list(prefix))
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let key = prefix.map(|p| p.to_string()).unwrap_or_default();
        faulty_list(self.faults.clone(), key, self.inner.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let key = prefix.map(|p| p.to_string()).unwrap_or_default();
        if self.faults.before(Op::List, &key).await == Some(Fault::Fail) {
            return Err(injected_error(Op::List, &key));
        }
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use object_store::memory::InMemory;

    fn store(faults: &Arc<Faults>) -> Faulty {
        Faulty::new(Arc::new(InMemory::new()), faults.clone())
    }

    #[tokio::test]
    async fn the_nth_matching_call_fails_once() {
        let faults = Faults::new(1);
        let s = store(&faults);
        faults.add(Rule::on(Op::Put, Fault::Fail).under("a/").nth(2));
        s.put(&Path::from("b/1"), PutPayload::from_static(b"x")).await.unwrap();
        s.put(&Path::from("a/1"), PutPayload::from_static(b"x")).await.unwrap();
        assert!(s.put(&Path::from("a/2"), PutPayload::from_static(b"x")).await.is_err());
        s.put(&Path::from("a/2"), PutPayload::from_static(b"x")).await.unwrap();
        assert_eq!(faults.injected(), 1);
        let keys: Vec<_> = s.list(None).map_ok(|m| m.location.to_string()).try_collect().await.unwrap();
        assert_eq!(keys.len(), 3);
    }

    #[tokio::test]
    async fn corruption_flips_one_byte_of_gets_only() {
        let faults = Faults::new(1);
        let s = store(&faults);
        let key = Path::from("k");
        s.put(&key, PutPayload::from_static(b"hello world")).await.unwrap();
        let id = faults.add(Rule::any(Fault::Corrupt));
        let whole = s.get(&key).await.unwrap().bytes().await.unwrap();
        let range = s.get_range(&key, 0..5).await.unwrap();
        assert_eq!(s.head(&key).await.unwrap().size, 11);
        assert_ne!(whole.as_ref(), b"hello world");
        assert_eq!(whole.len(), 11);
        assert_eq!(whole.iter().zip(b"hello world").filter(|(a, b)| a != b).count(), 1);
        assert_ne!(range.as_ref(), b"hello");
        faults.remove(id);
        assert_eq!(s.get(&key).await.unwrap().bytes().await.unwrap().as_ref(), b"hello world");
    }

    #[tokio::test]
    async fn probabilities_repeat_with_the_seed_and_lists_fail() {
        let pattern = |seed| async move {
            let faults = Faults::new(seed);
            let s = store(&faults);
            faults.add(Rule::on(Op::Head, Fault::Fail).with_probability(0.5));
            let mut out = Vec::new();
            for _ in 0..64 {
                let _ = s.head(&Path::from("missing")).await;
                out.push(faults.injected());
            }
            out
        };
        let first = pattern(7).await;
        assert_eq!(first, pattern(7).await, "the same seed injects into the same calls");
        assert!((10..54).contains(&first[63]), "about half of 64 calls fail: {}", first[63]);
        let faults = Faults::new(7);
        let s = store(&faults);
        faults.add(Rule::on(Op::List, Fault::Fail).under("x"));
        assert!(s.list(Some(&Path::from("x"))).try_collect::<Vec<_>>().await.is_err());
        assert!(s.list(Some(&Path::from("y"))).try_collect::<Vec<_>>().await.is_ok());
    }

    #[tokio::test]
    async fn stalls_wait_for_release() {
        let faults = Faults::new(1);
        let s = Arc::new(store(&faults));
        faults.add(Rule::on(Op::Get, Fault::Stall));
        let task = tokio::spawn({
            let s = s.clone();
            async move { s.get(&Path::from("none")).await.is_err() }
        });
        while faults.stalled() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!task.is_finished());
        faults.release_stalls();
        assert!(task.await.unwrap(), "a missing key is still NotFound after the stall");
    }
}
