use super::*;

/// Edits `golden/{name}.in.yaml` and compares with `golden/{name}.out.yaml` byte for byte
/// (`UPDATE_GOLDEN=1` rewrites the expected file; review the diff).
fn golden(name: &str, add: &[&str], remove: &[&str]) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/batch/kustomize/golden");
    let input = std::fs::read(format!("{dir}/{name}.in.yaml")).unwrap();
    let add: Vec<String> = add.iter().map(|s| (*s).to_owned()).collect();
    let remove: Vec<String> = remove.iter().map(|s| (*s).to_owned()).collect();
    let output = edit(&input, &add, &remove)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .unwrap_or_else(|| panic!("{name}: no change"));
    let expected_path = format!("{dir}/{name}.out.yaml");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&expected_path, &output).unwrap();
    }
    let expected = std::fs::read(&expected_path).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output),
        String::from_utf8_lossy(&expected),
        "{name}"
    );
    // Applying the same edit again changes nothing: no entry is ever listed twice.
    assert_eq!(edit(&output, &add, &remove).unwrap(), None, "{name}");
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn a_commented_kustomization_keeps_comments_order_and_foreign_entries() {
    golden(
        "commented",
        &[
            "apps/v1/deployments/shop/web.yaml",
            "core/v1/configmaps/shop/new.yaml",
        ],
        &["core/v1/configmaps/shop/old.yaml"],
    );
}

#[test]
fn an_indentless_list_with_quoted_entries_gets_entries_in_its_own_style() {
    // `b.yaml` is listed already (quoted): not added again.
    golden("indentless", &["b.yaml", "d.yaml"], &["c.yaml"]);
}

#[test]
fn a_flow_list_stays_a_flow_list() {
    // `./b.yaml` is the same file as `b.yaml`.
    golden("flow", &["b.yaml", "c.yaml"], &[]);
    golden("flow-multiline", &["c.yaml"], &[]);
}

#[test]
fn removing_from_a_flow_list_rewrites_only_the_list() {
    let input = b"kind: Kustomization\nresources: [a.yaml, \"b.yaml\", c.yaml]  # keep me\nnamePrefix: x-\n";
    let out = edit(input, &strings(&["d.yaml"]), &strings(&["b.yaml"]))
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "kind: Kustomization\nresources: [a.yaml, c.yaml, d.yaml]  # keep me\nnamePrefix: x-\n"
    );
}

#[test]
fn a_missing_resources_key_is_appended() {
    golden("missing-key", &["b.yaml", "a.yaml"], &[]);
}

#[test]
fn a_null_resources_value_becomes_a_list_and_keeps_its_comment() {
    golden("null-value", &["a.yaml"], &[]);
}

#[test]
fn removing_the_last_entry_leaves_an_empty_list() {
    golden("only-entry", &[], &["core/v1/configmaps/shop/only.yaml"]);
}

#[test]
fn crlf_files_keep_their_line_endings() {
    golden("crlf", &["b.yaml"], &["a.yaml"]);
}

#[test]
fn nothing_to_do_is_no_change() {
    let input = b"resources:\n- a.yaml\n";
    assert_eq!(edit(input, &strings(&["./a.yaml"]), &[]).unwrap(), None);
    assert_eq!(edit(input, &[], &strings(&["x.yaml"])).unwrap(), None);
}

#[test]
fn unreadable_kustomizations_are_refused_with_a_reason() {
    let add = strings(&["a.yaml"]);
    for (input, why) in [
        (&b"resources: [a.yaml\n"[..], "unclosed"),
        (b"- a.yaml\n- b.yaml\n", "not a mapping"),
        (b"resources: a.yaml\n", "not a list"),
        (b"resources:\n- {path: a.yaml}\n", "not a string"),
        (b"\xff\xfe", "UTF-8"),
    ] {
        match edit(input, &add, &[]) {
            Err(KustomizeError::Unreadable(_)) => {}
            other => panic!("{why}: {other:?}"),
        }
    }
}

#[test]
fn layouts_a_line_edit_cannot_handle_safely_are_refused() {
    let add = strings(&["b.yaml"]);
    // A flow mapping at the top: appending a block key would not parse.
    assert!(matches!(
        edit(b"{kind: Kustomization, resources: [a.yaml]}\n", &add, &[]),
        Err(KustomizeError::Uneditable(_))
    ));
    // Removing from a flow list with comments inside.
    assert!(matches!(
        edit(
            b"resources: [\n  a.yaml, # first\n  b.yaml,\n]\n",
            &[],
            &strings(&["a.yaml"])
        ),
        Err(KustomizeError::Uneditable(_))
    ));
}

#[test]
fn entries_that_are_not_plain_scalars_are_quoted() {
    let out = create(&strings(&["%43ase.yaml", "b c.yaml", "a.yaml", "./a.yaml"]));
    let parsed = Kustomization::parse(&out).unwrap();
    assert_eq!(parsed.resources(), ["%43ase.yaml", "a.yaml", "b c.yaml"]);
    let edited = edit(
        b"resources:\n- a.yaml\n",
        &strings(&["#x.yaml", "y: z.yaml"]),
        &[],
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        Kustomization::parse(&edited).unwrap().resources(),
        ["a.yaml", "#x.yaml", "y: z.yaml"]
    );
}

#[test]
fn folders_count_as_covered_by_themselves_their_parents_and_their_files() {
    let k = Kustomization::parse(b"resources: [apps, ./core/v1/configmaps/shop/a.yaml]\n").unwrap();
    assert!(k.covers_folder("apps"));
    assert!(k.covers_folder("apps/v1"));
    assert!(k.covers_folder("core/v1/configmaps/shop"));
    assert!(!k.covers_folder("core/v1/secrets"));
    assert!(!k.covers_folder("app"));
}

#[test]
fn the_quick_read_agrees_with_the_parser_or_declines() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/batch/kustomize/golden");
    let mut quick_read = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let Ok(parsed) = Kustomization::parse(&bytes) else {
            continue;
        };
        if let Some(quick) = quick_resources(&bytes) {
            quick_read += 1;
            assert_eq!(
                quick,
                parsed.resources(),
                "{}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }
    assert!(quick_read >= 4, "the usual layout is read quickly");
    for declined in [
        &b"resources: [a.yaml]\n"[..],
        b"resources:\n- \"a.yaml\"\n",
        b"resources:\n- a.yaml\n  continued\n",
        b"resources:\n  - a.yaml\n - b.yaml\n",
        b"---\nresources:\n- a.yaml\n---\nresources: []\n",
    ] {
        assert_eq!(
            quick_resources(declined),
            None,
            "{}",
            String::from_utf8_lossy(declined)
        );
    }
}

/// Layouts an append meets: each is edited once (parsed, which records the check), then appended to again; the
/// appends must give byte for byte what the parsing edit gives.
#[test]
fn appending_to_a_checked_file_writes_what_the_parsing_edit_writes() {
    let layouts: [&[u8]; 6] = [
        b"# Created by gitops-reverser\napiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n- a.yaml\n",
        b"kind: Kustomization\nresources:\n  - a.yaml  # first\n\n  # trailing comment\nnamePrefix: x-\n",
        b"resources:\n- a.yaml\n- ./sub\n",
        b"resources:\n- a.yaml",
        b"namePrefix: x-\nresources:\n    - a.yaml\npatches:\n- path: p.yaml\n",
        b"resources:\n- a.yaml\nconfigMapGenerator:\n- name: c\n  literals:\n  - k=v\n",
    ];
    for layout in layouts {
        let shown = String::from_utf8_lossy(layout).into_owned();
        let first = edit(layout, &strings(&["b.yaml"]), &[]).unwrap().unwrap();
        assert!(is_checked(&first), "{shown}");
        assert!(
            append_to_checked(&first, &strings(&["c.yaml", "d/e.yaml"])).is_some(),
            "the append applies: {shown}"
        );
        for add in [
            &["c.yaml", "d/e.yaml", "a.yaml", "c.yaml"][..],
            &["b.yaml"],
            &["./f.yaml", "sub/"],
            &["needs quotes.yaml"],
            &["123"],
            &["true"],
        ] {
            let add = strings(add);
            let appended = edit(&first, &add, &[]);
            let parsed = edit_parsed(&first, &add, &[]);
            assert_eq!(appended, parsed, "{shown} + {add:?}");
            if let Ok(Some(out)) = appended {
                assert!(
                    Kustomization::parse(&out).is_ok(),
                    "{}",
                    String::from_utf8_lossy(&out)
                );
            }
        }
    }
}

/// The append skips the parse only for bytes checked before: a file someone broke after the writer's last edit
/// (its `resources` list still reads fine line by line) is refused, not appended to.
#[test]
fn appending_never_trusts_bytes_that_were_not_checked() {
    let broken = b"resources:\n- a.yaml\nnamePrefix: [unclosed\n";
    assert!(quick_resources(broken).is_some());
    assert!(matches!(
        edit(broken, &strings(&["b.yaml"]), &[]),
        Err(KustomizeError::Unreadable(_))
    ));
    assert!(!is_checked(broken));
    // Two `resources` keys: never appended to without the parser, whatever the parser makes of them.
    let twice = b"resources:\n- a.yaml\nresources:\n- a.yaml\n";
    remember_checked(twice);
    let edited = edit(twice, &strings(&["b.yaml"]), &[]);
    assert_eq!(edited, edit_parsed(twice, &strings(&["b.yaml"]), &[]));
    // The list's lines inside a quoted scalar of a flow mapping that has the real list: whatever the parser makes
    // of it, never appended to without the parser.
    let quoted = b"{description: \"x\nresources:\n- a.yaml\n\", resources: [a.yaml]}\n";
    remember_checked(quoted);
    assert_eq!(
        edit(quoted, &strings(&["b.yaml"]), &[]),
        edit_parsed(quoted, &strings(&["b.yaml"]), &[])
    );
    // An explicit key the line reading does not see.
    let explicit = b"resources:\n- a.yaml\n? resources\n: [a.yaml]\n";
    remember_checked(explicit);
    assert_eq!(
        edit(explicit, &strings(&["b.yaml"]), &[]),
        edit_parsed(explicit, &strings(&["b.yaml"]), &[])
    );
}

/// A seed appends to the kustomization it created in every batch: each append is checked without a parse, so the
/// result of one is the checked input of the next.
#[test]
fn a_chain_of_appends_stays_checked() {
    let mut file = create(&strings(&["a.yaml"]));
    file = edit(&file, &strings(&["b.yaml"]), &[]).unwrap().unwrap();
    for batch in 0..5 {
        let add: Vec<String> = (0..3).map(|i| format!("ns/{batch}-{i}.yaml")).collect();
        assert!(append_to_checked(&file, &add).is_some(), "no parse needed");
        file = edit(&file, &add, &[]).unwrap().unwrap();
        assert!(is_checked(&file));
    }
    let parsed = Kustomization::parse(&file).unwrap();
    assert_eq!(parsed.resources().len(), 2 + 5 * 3);
    assert_eq!(quick_resources(&file).unwrap(), parsed.resources());
}
