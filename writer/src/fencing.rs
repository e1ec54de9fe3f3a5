//! Leader fencing: the newest leader term per cluster, so that a former agent leader (a frozen process that thaws,
//! messages left in a send buffer) can never write over its successor.
//!
//! Every stream of an agent that runs leader election says which term it speaks for (`Hello.leader_term`: the
//! Lease's uid, `leaseTransitions` and holder). [`Terms::enter`] admits a stream whose term is the newest known for
//! its cluster (raising it when newer) and refuses an older one; the returned [`Fence`] tells the stream at every
//! message, and as soon as it happens, when a newer term has said Hello.
//!
//! Order of terms ([`compare`], pure): within one Lease object (same uid) by `transitions`, and at equal
//! transitions only the holder that said Hello first; a Lease uid never seen before is a recreated Lease (newer),
//! and a uid that was replaced is stale for good. The newest term per cluster is persisted in
//! `{work-dir}/leader-terms.json` (written atomically when it rises, which happens once per failover), so a
//! restarted writer still refuses a former leader that connects before the current one.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

/// Lease uids remembered as replaced per cluster (a Lease is recreated rarely: namespace deleted, reinstall).
const RETIRED_LEASES: usize = 32;

/// One tenure of an agent's leader Lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Term {
    pub lease_uid: String,
    pub transitions: u64,
    pub holder: String,
}

impl std::fmt::Display for Term {
    /// `{transitions}/{holder}`, as in the commit trailer.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.transitions, self.holder)
    }
}

/// What the writer knows about one cluster's terms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub current: Term,
    /// Lease uids replaced by a newer Lease object.
    #[serde(default)]
    pub retired: Vec<String>,
}

/// How a term compares with the newest known one.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It is the newest term (another stream of the same leader).
    Current,
    /// Newer: it becomes the cluster's term and supersedes the streams of the older one.
    Newer,
    /// Older, or a second holder claiming the same term: refused, with why.
    Stale(String),
}

/// Compares `candidate` with what is known about its cluster. Pure.
pub fn compare(known: Option<&Record>, candidate: &Term) -> Verdict {
    let Some(known) = known else {
        return Verdict::Newer;
    };
    let current = &known.current;
    if candidate.lease_uid == current.lease_uid {
        return match candidate.transitions.cmp(&current.transitions) {
            std::cmp::Ordering::Greater => Verdict::Newer,
            std::cmp::Ordering::Equal if candidate.holder == current.holder => Verdict::Current,
            std::cmp::Ordering::Equal => Verdict::Stale(format!(
                "leader term {} is already held by {:?}",
                current.transitions, current.holder
            )),
            std::cmp::Ordering::Less => Verdict::Stale(format!(
                "leader term {candidate} is older than the current term {current}"
            )),
        };
    }
    if known.retired.contains(&candidate.lease_uid) {
        return Verdict::Stale(format!(
            "the leader Lease {} was replaced by a newer one; the current term is {current}",
            candidate.lease_uid
        ));
    }
    Verdict::Newer
}

/// A stream's admission under a term: whether it is still current.
#[derive(Clone, Debug)]
pub struct Fence {
    pub term: Term,
    current: watch::Receiver<Term>,
}

impl Fence {
    /// Why the stream may no longer write, when a newer term said Hello.
    pub fn superseded(&self) -> Option<String> {
        let current = self.current.borrow();
        (*current != self.term).then(|| {
            format!(
                "leader term {} was superseded by term {}",
                self.term, *current
            )
        })
    }

    /// Resolves once a newer term said Hello (never while this one is current).
    pub async fn wait_superseded(&mut self) -> String {
        loop {
            if let Some(why) = self.superseded() {
                return why;
            }
            if self.current.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

struct Cluster {
    record: Record,
    current: watch::Sender<Term>,
}

/// The newest term per cluster uid, persisted.
pub struct Terms {
    path: Option<PathBuf>,
    clusters: Mutex<HashMap<String, Cluster>>,
}

impl Terms {
    /// Terms kept only in memory (tests).
    pub fn in_memory() -> Self {
        Self {
            path: None,
            clusters: Mutex::default(),
        }
    }

    /// Loads `{work_dir}/leader-terms.json` (absent: nothing known yet).
    pub fn load(work_dir: &Path) -> Self {
        let path = work_dir.join("leader-terms.json");
        let records: BTreeMap<String, Record> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                // Refusing to start would stop every cluster; a fresh file only weakens fencing until each
                // cluster's current leader says Hello again.
                warn!(path = %path.display(), %error, "unreadable leader terms file; starting without known terms");
                BTreeMap::new()
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(error) => {
                warn!(path = %path.display(), %error, "cannot read the leader terms file; starting without known terms");
                BTreeMap::new()
            }
        };
        let clusters = records
            .into_iter()
            .map(|(uid, record)| {
                let (current, _) = watch::channel(record.current.clone());
                (uid, Cluster { record, current })
            })
            .collect();
        Self {
            path: Some(path),
            clusters: Mutex::new(clusters),
        }
    }

    /// The newest known term of a cluster.
    pub fn current(&self, cluster_uid: &str) -> Option<Term> {
        let clusters = self.clusters.lock().expect("terms lock");
        clusters.get(cluster_uid).map(|c| c.record.current.clone())
    }

    /// Admits a stream of `cluster_uid` speaking for `term`, raising the cluster's term when it is newer (which
    /// supersedes the streams of the older term at once), or says why it is stale.
    pub fn enter(&self, cluster_uid: &str, term: Term) -> Result<Fence, String> {
        let mut clusters = self.clusters.lock().expect("terms lock");
        let known = clusters.get(cluster_uid).map(|c| &c.record);
        match compare(known, &term) {
            Verdict::Stale(why) => Err(why),
            Verdict::Current => {
                let cluster = clusters.get(cluster_uid).expect("known");
                Ok(Fence {
                    term,
                    current: cluster.current.subscribe(),
                })
            }
            Verdict::Newer => {
                match clusters.get_mut(cluster_uid) {
                    Some(cluster) => {
                        let old = cluster.record.current.clone();
                        if old.lease_uid != term.lease_uid {
                            cluster.record.retired.push(old.lease_uid.clone());
                            let excess =
                                cluster.record.retired.len().saturating_sub(RETIRED_LEASES);
                            cluster.record.retired.drain(..excess);
                        }
                        cluster.record.current = term.clone();
                        cluster.current.send_replace(term.clone());
                        info!(cluster = cluster_uid, old = %old, new = %term, "newer agent leader term: streams of the older term are cut off");
                    }
                    None => {
                        let (current, _) = watch::channel(term.clone());
                        clusters.insert(
                            cluster_uid.to_owned(),
                            Cluster {
                                record: Record {
                                    current: term.clone(),
                                    retired: Vec::new(),
                                },
                                current,
                            },
                        );
                        info!(cluster = cluster_uid, term = %term, "first agent leader term of the cluster");
                    }
                }
                self.persist(&clusters);
                let cluster = clusters.get(cluster_uid).expect("just set");
                Ok(Fence {
                    term,
                    current: cluster.current.subscribe(),
                })
            }
        }
    }

    /// Writes every record (temporary file, fsync, rename). A failure is logged: the term still holds in memory.
    fn persist(&self, clusters: &HashMap<String, Cluster>) {
        let Some(path) = &self.path else {
            return;
        };
        let records: BTreeMap<&String, &Record> =
            clusters.iter().map(|(uid, c)| (uid, &c.record)).collect();
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            let bytes = serde_json::to_vec_pretty(&records).map_err(std::io::Error::other)?;
            let tmp = path.with_extension("json.tmp");
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        if let Err(error) = write() {
            warn!(path = %path.display(), %error, "could not persist the leader terms; a restarted writer learns them again from the current leaders");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn term(uid: &str, transitions: u64, holder: &str) -> Term {
        Term {
            lease_uid: uid.into(),
            transitions,
            holder: holder.into(),
        }
    }

    fn record(current: Term, retired: &[&str]) -> Record {
        Record {
            current,
            retired: retired.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn terms_are_ordered_by_transitions_within_one_lease() {
        let known = record(term("L", 3, "b"), &[]);
        assert_eq!(compare(None, &term("L", 0, "a")), Verdict::Newer);
        assert_eq!(compare(Some(&known), &term("L", 4, "a")), Verdict::Newer);
        assert_eq!(compare(Some(&known), &term("L", 3, "b")), Verdict::Current);
        assert!(matches!(
            compare(Some(&known), &term("L", 2, "a")),
            Verdict::Stale(_)
        ));
        assert!(
            matches!(compare(Some(&known), &term("L", 3, "a")), Verdict::Stale(_)),
            "two holders never share a term"
        );
    }

    #[test]
    fn a_recreated_lease_is_newer_and_the_replaced_one_stale_for_good() {
        let known = record(term("L2", 0, "b"), &["L1"]);
        assert_eq!(compare(Some(&known), &term("L3", 0, "c")), Verdict::Newer);
        assert!(matches!(
            compare(Some(&known), &term("L1", 99, "a")),
            Verdict::Stale(_)
        ));
    }

    #[test]
    fn a_newer_term_supersedes_the_fences_of_the_older_one() {
        let terms = Terms::in_memory();
        let old = terms.enter("c1", term("L", 1, "a")).unwrap();
        let same = terms.enter("c1", term("L", 1, "a")).unwrap();
        let other_cluster = terms.enter("c2", term("M", 0, "x")).unwrap();
        assert!(old.superseded().is_none());
        let new = terms.enter("c1", term("L", 2, "b")).unwrap();
        assert!(old.superseded().is_some() && same.superseded().is_some());
        assert!(new.superseded().is_none() && other_cluster.superseded().is_none());
        assert!(terms.enter("c1", term("L", 1, "a")).is_err());
    }

    #[test]
    fn terms_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let terms = Terms::load(dir.path());
            terms.enter("c1", term("L1", 5, "a")).unwrap();
            terms.enter("c1", term("L2", 0, "b")).unwrap();
        }
        let terms = Terms::load(dir.path());
        assert_eq!(terms.current("c1"), Some(term("L2", 0, "b")));
        assert!(terms.enter("c1", term("L1", 6, "a")).is_err());
        assert!(terms.enter("c1", term("L2", 1, "c")).is_ok());
    }
}
