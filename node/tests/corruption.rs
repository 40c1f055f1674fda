//! A damaged store on a real `verge` process: bytes of a stopped node's redb file are changed
//! where two documents live, one inside a stored change (Automerge's checksum then fails) and
//! one in a key's length (redb then panics while decoding the page). Every request is answered,
//! `verge check` finds the damage, and `verge check --repair` rebuilds the store so that the
//! node fetches the lost documents again from its peer.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use common::cluster::Cluster;
use common::{Node, wait_for};

const MARKER: &[u8] = b"MARKER-CHECKSUM-7f3a9";
const KEY_TARGET: &str = "corrupt/key-target";
const CHECKSUM_TARGET: &str = "corrupt/checksum";
const DEADLINE: Duration = Duration::from_secs(30);

fn ids() -> Vec<String> {
    let mut ids: Vec<String> = (0..40).map(|i| format!("corrupt/ok-{i:02}")).collect();
    ids.push(KEY_TARGET.into());
    ids.push(CHECKSUM_TARGET.into());
    ids
}

fn content(id: &str) -> serde_json::Value {
    if id == CHECKSUM_TARGET {
        json!({ "m": String::from_utf8_lossy(MARKER) })
    } else {
        json!({ "id": id })
    }
}

/// Replaces every occurrence of `from` in `bytes` with `to` (same length); how many there were.
fn replace_all(bytes: &mut [u8], from: &[u8], to: &[u8]) -> usize {
    assert_eq!(from.len(), to.len());
    let mut found = 0;
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
            found += 1;
            i += from.len();
        } else {
            i += 1;
        }
    }
    found
}

fn verge_check(node: &Node, repair: bool) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_verge"));
    cmd.args(["check", "--data-dir", &node.data_dir.display().to_string()]);
    if repair {
        cmd.arg("--repair");
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn a_damaged_store_answers_every_request_and_is_repaired_from_a_peer() {
    let mut cluster = Cluster::start("corrupt", 2, 0, |i| if i == 1 { vec![0] } else { vec![] });
    cluster.wait_connected();
    for id in ids() {
        cluster.nodes[0]
            .put_doc(&id, &content(&id))
            .ok_json(&format!("PUT {id}"));
    }
    for id in ids() {
        wait_for(DEADLINE, &format!("{id} at the peer"), || {
            match cluster.nodes[1].get_doc(&id).status {
                200 => Ok(()),
                s => Err(format!("{s}")),
            }
        });
    }

    // Damage the stopped node's file: the marker inside CHECKSUM_TARGET's change, and the
    // length byte of KEY_TARGET's change-row keys (a (&str, u64) key starts with the string's
    // length as a varint: 18 becomes 127, past the key's end).
    let a = &mut cluster.nodes[0];
    assert!(a.terminate(DEADLINE).success());
    let file = a.data_dir.join("verge.redb");
    let mut bytes = fs::read(&file).unwrap();
    let mut flipped = MARKER.to_vec();
    flipped[0] ^= 0x01;
    assert!(
        replace_all(&mut bytes, MARKER, &flipped) >= 1,
        "marker not in the file"
    );
    let mut key = vec![KEY_TARGET.len() as u8];
    key.extend_from_slice(KEY_TARGET.as_bytes());
    let mut bad_key = key.clone();
    bad_key[0] = 0x7f;
    assert!(
        replace_all(&mut bytes, &key, &bad_key) >= 1,
        "the change-row key of {KEY_TARGET} is not in the file"
    );
    fs::write(&file, &bytes).unwrap();

    // Every request is answered: the damaged documents with 500 document_unreadable (writes
    // too), the others as before.
    a.spawn();
    let mut unreadable = BTreeSet::new();
    for id in ids() {
        let r = a.get_doc(&id);
        match r.status {
            200 => assert_eq!(r.json()["doc"], content(&id), "{id}"),
            _ => {
                r.assert_error(500, "document_unreadable", &format!("GET {id}"));
                unreadable.insert(id);
            }
        }
    }
    assert!(unreadable.contains(KEY_TARGET), "{unreadable:?}");
    assert!(unreadable.contains(CHECKSUM_TARGET), "{unreadable:?}");
    let patch = a.patch_doc(
        KEY_TARGET,
        json!([{ "op": "set", "path": ["x"], "value": 1 }]),
    );
    patch.assert_error(500, "document_unreadable", "PATCH of a damaged document");
    assert!(
        patch.text().contains("verge check --repair"),
        "{}",
        patch.text()
    );
    assert!(a.metric("verge_documents_unreadable_total") >= unreadable.len() as f64);
    assert_eq!(
        a.metric("verge_api_panics_total"),
        0.0,
        "storage panics are caught at the store"
    );
    let log = a.output();
    assert!(
        log.contains("failed inside the storage engine"),
        "the key's damage makes redb panic, and the store catches it:\n{}",
        common::tail(&log, 3000)
    );

    // `verge check` names exactly those documents; `--repair` rebuilds the store without them.
    assert!(a.terminate(DEADLINE).success());
    let (ok, report) = verge_check(a, false);
    assert!(!ok, "check must fail on a damaged store:\n{report}");
    let listed: BTreeSet<String> = report
        .lines()
        .filter_map(|l| l.trim().strip_prefix("unreadable: "))
        .map(|l| l.split(':').next().unwrap().to_owned())
        .collect();
    assert_eq!(listed, unreadable, "{report}");
    let (ok, report) = verge_check(a, true);
    assert!(ok, "{report}");
    assert!(report.contains("rebuilt"), "{report}");
    let damaged = fs::read_dir(&a.data_dir)
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("verge.redb.damaged-")
        });
    assert!(damaged, "the damaged file is kept");
    let (ok, report) = verge_check(a, false);
    assert!(ok, "the rebuilt store checks clean:\n{report}");

    // Started again, the node fetches the lost documents from its peer.
    a.spawn();
    for id in ids() {
        wait_for(DEADLINE, &format!("{id} back at the repaired node"), || {
            let r = a.get_doc(&id);
            match r.status {
                200 if r.json()["doc"] == content(&id) => Ok(()),
                _ => Err(r.describe()),
            }
        });
    }
}
