//! Kustomizations, namespace-free objects and the ignore rules in plans.

use super::*;
use crate::model::{KustomizationMode, Placement};

fn placed(base: &str, kustomization: KustomizationMode, omit_namespace: bool) -> DestinationRef {
    let mut d = destination(base, false);
    d.placement = Placement {
        kustomization,
        omit_namespace,
    };
    d
}

fn file<'p>(plan: &'p Plan, path: &str) -> Option<&'p str> {
    plan.commits
        .iter()
        .flat_map(|c| &c.changes)
        .rev()
        .find(|f| f.path == path)
        .and_then(|f| f.content.as_deref())
        .map(|c| std::str::from_utf8(c).unwrap())
}

fn resources(text: &str) -> Vec<String> {
    kustomize::Kustomization::parse(text.as_bytes())
        .unwrap()
        .resources()
        .to_vec()
}

#[test]
fn create_mode_makes_one_sorted_kustomization_at_the_base_folder() {
    let d = placed("c", KustomizationMode::Create, false);
    let b = buffer(vec![
        upsert(&d, 1, "core/v1/configmaps/shop/b.yaml", CM, None),
        upsert(&d, 2, "apps/v1/deployments/shop/a.yaml", CM, None),
    ]);
    let p = plan(b.entries(), &tree(&[]), &context(500)).unwrap();
    let k = file(&p, "c/kustomization.yaml").expect("created");
    assert_eq!(
        resources(k),
        [
            "apps/v1/deployments/shop/a.yaml",
            "core/v1/configmaps/shop/b.yaml"
        ]
    );
    assert!(k.contains("kind: Kustomization"), "{k}");
}

#[test]
fn maintain_mode_without_a_kustomization_writes_none() {
    let d = placed("c", KustomizationMode::Maintain, false);
    let b = buffer(vec![upsert(
        &d,
        1,
        "core/v1/configmaps/shop/b.yaml",
        CM,
        None,
    )]);
    let p = plan(b.entries(), &tree(&[]), &context(500)).unwrap();
    assert!(
        p.commits
            .iter()
            .flat_map(|c| &c.changes)
            .all(|f| !kustomize::is_kustomization_file(&f.path))
    );
}

#[test]
fn the_nearest_kustomization_gets_the_file_and_its_parent_gets_its_folder() {
    let d = placed("c", KustomizationMode::Maintain, false);
    let marker = marker_for("uid-a");
    let t = tree(&[
        ("c/.configbutler/owner.yaml", &marker),
        ("c/kustomization.yaml", "resources:\n- other.yaml\n"),
        (
            "c/core/v1/kustomization.yml",
            "# nested\nresources: [configmaps/shop/old.yaml]\n",
        ),
        ("c/core/v1/configmaps/shop/old.yaml", CM),
    ]);
    let b = buffer(vec![
        upsert(&d, 1, "core/v1/configmaps/shop/new.yaml", CM, None),
        upsert(&d, 2, "apps/v1/deployments/shop/web.yaml", CM, None),
        delete(&d, 3, "core/v1/configmaps/shop/old.yaml"),
    ]);
    let p = plan(b.entries(), &t, &context(500)).unwrap();
    assert_eq!(
        file(&p, "c/core/v1/kustomization.yml").unwrap(),
        "# nested\nresources: [configmaps/shop/new.yaml]\n"
    );
    assert_eq!(
        resources(file(&p, "c/kustomization.yaml").unwrap()),
        ["other.yaml", "apps/v1/deployments/shop/web.yaml", "core/v1"]
    );
}

#[test]
fn re_sent_files_are_listed_in_a_commit_of_their_own_and_listed_ones_change_nothing() {
    let d = placed("c", KustomizationMode::Maintain, false);
    let marker = marker_for("uid-a");
    let t = tree(&[
        ("c/.configbutler/owner.yaml", &marker),
        ("c/.sourceignore", kustomize::render_sourceignore()),
        (
            "c/kustomization.yaml",
            "resources:\n- core/v1/configmaps/shop/a.yaml\n",
        ),
        ("c/core/v1/configmaps/shop/a.yaml", CM),
        ("c/core/v1/configmaps/shop/b.yaml", CM),
    ]);
    // Both are no-ops; only b is not listed yet.
    let b = buffer(vec![
        upsert(&d, 1, "core/v1/configmaps/shop/a.yaml", CM, None),
        upsert(&d, 2, "core/v1/configmaps/shop/b.yaml", CM, None),
    ]);
    let p = plan(b.entries(), &t, &context(500)).unwrap();
    assert_eq!(p.commits.len(), 1);
    assert_eq!(
        changed_paths(&p),
        [("c/kustomization.yaml".to_owned(), true)]
    );
    assert!(p.commits[0].message.starts_with("List 1 mirrored files"));
    let t = tree(&[
        ("c/.configbutler/owner.yaml", &marker),
        (
            "c/kustomization.yaml",
            "resources:\n- core/v1/configmaps/shop/a.yaml\n",
        ),
        ("c/core/v1/configmaps/shop/a.yaml", CM),
    ]);
    let b = buffer(vec![upsert(
        &d,
        1,
        "core/v1/configmaps/shop/a.yaml",
        CM,
        None,
    )]);
    assert!(
        plan(b.entries(), &t, &context(500))
            .unwrap()
            .commits
            .is_empty()
    );
}

#[test]
fn swept_orphans_are_unlisted_and_sweeps_never_delete_a_kustomization() {
    let d = placed("c", KustomizationMode::Maintain, false);
    let marker = marker_for("uid-a");
    let t = tree(&[
        ("c/.configbutler/owner.yaml", &marker),
        (
            "c/core/v1/configmaps/ns/kustomization.yaml",
            "resources:\n- keep.yaml\n- orphan.yaml\n- ../../../../extra.yaml\n",
        ),
        ("c/core/v1/configmaps/ns/keep.yaml", CM),
        ("c/core/v1/configmaps/ns/orphan.yaml", CM),
    ]);
    let b = buffer(vec![
        snapshot(&d, 1, "core/v1/configmaps/ns", true, 1, true),
        upsert(&d, 2, "core/v1/configmaps/ns/keep.yaml", CM, None),
        snapshot(&d, 3, "core/v1/configmaps/ns", true, 1, false),
    ]);
    let p = plan(b.entries(), &t, &context(500)).unwrap();
    let changed = changed_paths(&p);
    assert!(changed.contains(&("c/core/v1/configmaps/ns/orphan.yaml".to_owned(), false)));
    assert!(changed.contains(&(
        "c/core/v1/configmaps/ns/kustomization.yaml".to_owned(),
        true
    )));
    assert_eq!(
        file(&p, "c/core/v1/configmaps/ns/kustomization.yaml").unwrap(),
        "resources:\n- keep.yaml\n- ../../../../extra.yaml\n"
    );
}

#[test]
fn an_unreadable_kustomization_is_left_alone_and_reported_while_objects_are_written() {
    let d = placed("c", KustomizationMode::Create, false);
    let t = tree(&[("c/kustomization.yaml", "resources: [unclosed\n")]);
    let b = buffer(vec![upsert(
        &d,
        1,
        "core/v1/configmaps/shop/a.yaml",
        CM,
        None,
    )]);
    let p = plan(b.entries(), &t, &context(500)).unwrap();
    assert!(file(&p, "c/core/v1/configmaps/shop/a.yaml").is_some());
    assert!(file(&p, "c/kustomization.yaml").is_none());
    assert_eq!(p.kustomization_problems.len(), 1);
    assert!(
        p.kustomization_problems[0]
            .1
            .contains("c/kustomization.yaml"),
        "{:?}",
        p.kustomization_problems
    );
}

#[test]
fn an_object_named_like_a_kustomization_is_refused_only_when_kustomizations_are_kept() {
    for (mode, refused) in [
        (KustomizationMode::Off, false),
        (KustomizationMode::Maintain, true),
    ] {
        let d = placed("c", mode, false);
        let b = buffer(vec![
            upsert(
                &d,
                1,
                "core/v1/configmaps/shop/kustomization.yaml",
                CM,
                None,
            ),
            upsert(&d, 2, "core/v1/configmaps/shop/b.yaml", CM, None),
        ]);
        let p = plan(b.entries(), &tree(&[]), &context(500)).unwrap();
        assert_eq!(
            p.path_conflicts.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            if refused { vec![0] } else { vec![] },
            "{mode:?}"
        );
        assert!(file(&p, "c/core/v1/configmaps/shop/b.yaml").is_some());
    }
}

#[test]
fn the_same_name_in_two_namespaces_is_refused_when_namespaces_are_omitted() {
    let marker = marker_for("uid-a");
    let t = tree(&[
        ("c/.configbutler/owner.yaml", &marker),
        ("c/core/v1/configmaps/a/app.yaml", CM),
    ]);
    for omit in [false, true] {
        let d = placed("c", KustomizationMode::Off, omit);
        let b = buffer(vec![
            // Clashes with the tree.
            upsert(&d, 1, "core/v1/configmaps/b/app.yaml", CM, None),
            // Clashes with the earlier write of the batch.
            upsert(&d, 2, "core/v1/configmaps/a/web.yaml", CM, None),
            upsert(&d, 3, "core/v1/configmaps/c/web.yaml", CM, None),
            // Another resource, another name: fine; updating the existing file too.
            upsert(&d, 4, "core/v1/secrets/b/app.yaml", CM, None),
            upsert(&d, 5, "core/v1/configmaps/a/app.yaml", CM2, None),
        ]);
        let p = plan(b.entries(), &t, &context(500)).unwrap();
        let refused: Vec<usize> = p.namespace_clashes.iter().map(|(i, _)| *i).collect();
        if omit {
            assert_eq!(refused, [0, 2]);
            assert!(
                p.namespace_clashes[0].1.contains("namespace a"),
                "{:?}",
                p.namespace_clashes
            );
            assert!(file(&p, "c/core/v1/configmaps/b/app.yaml").is_none());
        } else {
            assert!(refused.is_empty());
        }
        assert!(file(&p, "c/core/v1/secrets/b/app.yaml").is_some());
        assert!(file(&p, "c/core/v1/configmaps/a/app.yaml").is_some());
    }
    // Once the other namespace's file goes, the name is free.
    let d = placed("c", KustomizationMode::Off, true);
    let b = buffer(vec![
        delete(&d, 1, "core/v1/configmaps/a/app.yaml"),
        upsert(&d, 2, "core/v1/configmaps/b/app.yaml", CM, None),
    ]);
    let p = plan(b.entries(), &t, &context(500)).unwrap();
    assert!(p.namespace_clashes.is_empty());
}

#[test]
fn the_ignore_rules_are_written_once_kept_current_and_a_persons_are_left_alone() {
    let d = destination("c", false);
    let b = buffer(vec![upsert(
        &d,
        1,
        "core/v1/configmaps/shop/a.yaml",
        CM,
        None,
    )]);
    let p = plan(b.entries(), &tree(&[]), &context(500)).unwrap();
    assert_eq!(
        file(&p, "c/.sourceignore").unwrap(),
        kustomize::render_sourceignore()
    );
    let stale = "# Written by gitops-reverser: older rules\n/.sops.yaml\n";
    let p = plan(
        b.entries(),
        &tree(&[("c/.sourceignore", stale)]),
        &context(500),
    )
    .unwrap();
    assert_eq!(
        file(&p, "c/.sourceignore").unwrap(),
        kustomize::render_sourceignore()
    );
    // A folder of that name is left alone (writing the file would make git refuse the whole batch).
    let p = plan(
        b.entries(),
        &tree(&[("c/.sourceignore/notes.txt", "x")]),
        &context(500),
    )
    .unwrap();
    assert!(file(&p, "c/.sourceignore").is_none());
    assert!(file(&p, "c/core/v1/configmaps/shop/a.yaml").is_some());
    let own = "# mine\n*.txt\n";
    let p = plan(
        b.entries(),
        &tree(&[("c/.sourceignore", own)]),
        &context(500),
    )
    .unwrap();
    assert!(file(&p, "c/.sourceignore").is_none());
}
