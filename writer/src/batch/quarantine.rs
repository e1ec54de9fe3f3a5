//! Quarantine by bisection: when the commits of a batch cannot be built for a reason the planner did not foresee
//! (git's tree rules refuse them), the batch is split in halves, each half built on top of the previous one, until
//! the messages that cannot be committed are alone; those are refused, everything else is committed.
//!
//! Only deterministic refusals ([`Attempt::Refused`]) are bisected: a build that fails for a transient reason
//! (I/O, a full disk) aborts the whole attempt with its error, so no message is ever blamed for the machine.
//! Halves keep arrival order (the first half is built first, the second on its result), so the latest content per
//! path still wins and a snapshot's sweep still sees what the earlier messages left. A batch with one refused
//! message among `n` costs about `2·log2(n)` extra builds, smaller each time; a healthy batch costs nothing extra.

/// The result of building a subset of a batch.
pub enum Attempt<S, B> {
    /// Built: the state after it (the new tip) and what was built (the plan).
    Built(S, B),
    /// Refused deterministically: the same messages on the same state fail the same way. Says why.
    Refused(String),
}

/// What [`isolate`] produced.
pub struct Isolated<S, B> {
    /// The state after the last successful build (the start state when nothing was built).
    pub end: S,
    /// The successful builds, in order.
    pub built: Vec<B>,
    /// Messages (indexes) that cannot be built even alone, with the reason, in arrival order.
    pub refused: Vec<(usize, String)>,
}

/// Builds `indices` (in order) on top of `start` with `build`; on a refusal, splits and retries the halves until
/// every refused message is alone. `build` is never called with an empty slice. A transient error ends it.
pub fn isolate<S: Clone, B, E>(
    indices: &[usize],
    start: S,
    build: &mut impl FnMut(&[usize], &S) -> Result<Attempt<S, B>, E>,
) -> Result<Isolated<S, B>, E> {
    let mut out = Isolated {
        end: start,
        built: Vec::new(),
        refused: Vec::new(),
    };
    split(indices, build, &mut out)?;
    Ok(out)
}

fn split<S: Clone, B, E>(
    indices: &[usize],
    build: &mut impl FnMut(&[usize], &S) -> Result<Attempt<S, B>, E>,
    out: &mut Isolated<S, B>,
) -> Result<(), E> {
    if indices.is_empty() {
        return Ok(());
    }
    match build(indices, &out.end)? {
        Attempt::Built(next, built) => {
            out.end = next;
            out.built.push(built);
        }
        Attempt::Refused(why) if indices.len() == 1 => out.refused.push((indices[0], why)),
        Attempt::Refused(_) => {
            let (first, second) = indices.split_at(indices.len() / 2);
            split(first, build, out)?;
            split(second, build, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A builder over a list of "files": a message is a path; building refuses any set containing a poisoned
    /// message, or a message that clashes with one already built (`a` then `a/b`: a file and a folder).
    type Tree = Vec<&'static str>;

    fn builder(
        messages: &[&'static str],
        poisoned: &'static [&'static str],
    ) -> impl FnMut(&[usize], &Tree) -> Result<Attempt<Tree, Vec<usize>>, String> {
        let messages = messages.to_vec();
        move |indices, tree| {
            let mut next = tree.clone();
            for &i in indices {
                let path = messages[i];
                if path == "transient" {
                    return Err("disk full".into());
                }
                let clash = next.iter().any(|p: &&str| {
                    p.starts_with(&format!("{path}/")) || path.starts_with(&format!("{p}/"))
                });
                if poisoned.contains(&path) || clash {
                    return Ok(Attempt::Refused(format!("cannot build {path}")));
                }
                next.push(path);
            }
            Ok(Attempt::Built(next, indices.to_vec()))
        }
    }

    #[test]
    fn a_healthy_batch_is_built_once() {
        let mut build = builder(&["a", "b", "c"], &[]);
        let out = isolate(&[0, 1, 2], Vec::new(), &mut build).unwrap();
        assert_eq!(out.built, vec![vec![0, 1, 2]]);
        assert!(out.refused.is_empty());
        assert_eq!(out.end, vec!["a", "b", "c"]);
    }

    #[test]
    fn only_the_refused_messages_are_isolated_and_the_rest_keeps_its_order() {
        let messages = ["a", "bad", "c", "d", "e", "f", "bad2", "h"];
        let mut build = builder(&messages, &["bad", "bad2"]);
        let all: Vec<usize> = (0..messages.len()).collect();
        let out = isolate(&all, Vec::new(), &mut build).unwrap();
        assert_eq!(
            out.refused,
            vec![
                (1, "cannot build bad".into()),
                (6, "cannot build bad2".into())
            ]
        );
        assert_eq!(out.end, vec!["a", "c", "d", "e", "f", "h"]);
        let built: Vec<usize> = out.built.into_iter().flatten().collect();
        assert_eq!(built, vec![0, 2, 3, 4, 5, 7]);
    }

    #[test]
    fn a_clash_between_two_messages_refuses_the_later_one() {
        let mut build = builder(&["x", "y", "x/z", "w"], &[]);
        let out = isolate(&[0, 1, 2, 3], Vec::new(), &mut build).unwrap();
        assert_eq!(out.refused, vec![(2, "cannot build x/z".into())]);
        assert_eq!(out.end, vec!["x", "y", "w"]);
    }

    #[test]
    fn every_message_refused_alone_leaves_the_start_state() {
        let mut build = builder(&["p", "q"], &["p", "q"]);
        let out = isolate(&[0, 1], vec!["base"], &mut build).unwrap();
        assert_eq!(out.refused.len(), 2);
        assert!(out.built.is_empty());
        assert_eq!(out.end, vec!["base"]);
    }

    #[test]
    fn a_transient_error_blames_no_message() {
        let mut build = builder(&["a", "bad", "transient", "d"], &["bad"]);
        let result = isolate(&[0, 1, 2, 3], Vec::new(), &mut build);
        assert_eq!(result.err().as_deref(), Some("disk full"));
    }

    #[test]
    fn builds_are_bounded_by_about_two_log_n_per_refused_message() {
        let messages: Vec<&'static str> = (0..1024)
            .map(|i| if i == 700 { "bad" } else { "ok" })
            .collect();
        let mut count = 0;
        let mut build = |indices: &[usize], _: &()| -> Result<Attempt<(), ()>, ()> {
            count += 1;
            Ok(if indices.iter().any(|&i| messages[i] == "bad") {
                Attempt::Refused("bad".into())
            } else {
                Attempt::Built((), ())
            })
        };
        let all: Vec<usize> = (0..messages.len()).collect();
        let out = isolate(&all, (), &mut build).unwrap();
        assert_eq!(out.refused, vec![(700, "bad".into())]);
        assert!(count <= 2 * 10 + 1, "{count} builds");
    }
}
