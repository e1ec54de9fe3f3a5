//! What the comment-preserving edit of an update costs (`cargo bench -p reverser-writer --bench yaml_edit`).
//!
//! - the fast path (`same_layout`) on a file in the writer's own layout, the case of every update the writer
//!   made itself: a byte scan, no parse;
//! - `edit_in_place` of a commented ~2 KiB Deployment (a value changed);
//! - `edit_in_place` of a commented ~200 KiB ConfigMap (a value changed, a key added, a key removed);
//! - for scale, `semantically_equal` of the same pairs (the no-op check every update already runs).

use std::hint::black_box;
use std::time::{Duration, Instant};

use reverser_common::{yaml, yaml_edit};
use testkit::corpus;

/// Mean time of `f` over at least `budget` of runs.
fn time(budget: Duration, mut f: impl FnMut()) -> Duration {
    f();
    let started = Instant::now();
    let mut runs = 0u32;
    while started.elapsed() < budget {
        f();
        runs += 1;
    }
    started.elapsed() / runs.max(1)
}

/// A person's version of `canonical`: a comment above every third line and at the end of the others.
fn commented(canonical: &str) -> String {
    let mut out = String::from("# maintained by hand, see README\n");
    for (i, line) in canonical.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let key_indent = if line.trim_start().starts_with("- ") {
            indent + 2
        } else {
            indent
        };
        if i % 3 == 0 && i > 0 && !line.trim_start().starts_with("- ") {
            out.push_str(&" ".repeat(key_indent));
            out.push_str("# why this is set\n");
            out.push_str(line);
        } else if line.ends_with(':') {
            out.push_str(line);
        } else {
            out.push_str(line);
            out.push_str(" # checked");
        }
        out.push('\n');
    }
    out
}

fn big_configmap(keys: usize, changed: bool) -> String {
    let mut out = String::from(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: big\n  namespace: shop\ndata:\n",
    );
    for k in 0..keys {
        if changed && k == 7 {
            continue;
        }
        let value = if changed && k == keys / 2 {
            "changed"
        } else {
            "some-value-of-the-setting"
        };
        out.push_str(&format!("  setting-{k:05}: {value}\n"));
        if changed && k == 100 {
            out.push_str("  setting-00100a: added\n");
        }
    }
    out
}

fn main() {
    let budget = Duration::from_secs(2);
    let small_old = corpus::deployment(1, "1");
    let small_new = corpus::deployment(1, "2");
    let small_commented = commented(&small_old);
    assert!(yaml_edit::same_layout(
        small_old.as_bytes(),
        small_new.as_bytes()
    ));
    assert!(!yaml_edit::same_layout(
        small_commented.as_bytes(),
        small_new.as_bytes()
    ));
    let big_old = big_configmap(4700, false);
    let big_new = big_configmap(4700, true);
    let big_commented = commented(&big_old);
    for (old, new) in [(&small_commented, &small_new), (&big_commented, &big_new)] {
        let edited = yaml_edit::edit_in_place(old, new).expect("edited in place");
        assert!(yaml::semantically_equal(edited.as_bytes(), new.as_bytes()));
        assert!(edited.contains("# why this is set"));
    }

    println!(
        "files: deployment {} B canonical, {} B commented; configmap {} B canonical, {} B commented",
        small_old.len(),
        small_commented.len(),
        big_old.len(),
        big_commented.len()
    );
    let rows: [(&str, Duration); 5] = [
        (
            "fast path (same_layout), canonical 2 KiB Deployment",
            time(budget, || {
                black_box(yaml_edit::same_layout(
                    black_box(small_old.as_bytes()),
                    black_box(small_new.as_bytes()),
                ));
            }),
        ),
        (
            "semantically_equal, canonical 2 KiB Deployment (runs on every update already)",
            time(budget, || {
                black_box(yaml::semantically_equal(
                    black_box(small_old.as_bytes()),
                    black_box(small_new.as_bytes()),
                ));
            }),
        ),
        (
            "edit_in_place, commented 2 KiB Deployment",
            time(budget, || {
                black_box(
                    yaml_edit::edit_in_place(black_box(&small_commented), black_box(&small_new))
                        .ok(),
                );
            }),
        ),
        (
            "semantically_equal, commented 200 KiB ConfigMap",
            time(budget, || {
                black_box(yaml::semantically_equal(
                    black_box(big_commented.as_bytes()),
                    black_box(big_new.as_bytes()),
                ));
            }),
        ),
        (
            "edit_in_place, commented 200 KiB ConfigMap",
            time(budget, || {
                black_box(
                    yaml_edit::edit_in_place(black_box(&big_commented), black_box(&big_new)).ok(),
                );
            }),
        ),
    ];
    for (what, took) in rows {
        println!("{what:<80} {:>10.1} µs", took.as_secs_f64() * 1e6);
    }
}
