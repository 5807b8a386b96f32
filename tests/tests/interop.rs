//! The relay against reading centers we did not write: every dataset that
//! storescu sends arrives byte-identical, whatever its transfer syntax and
//! character set.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use kakehashi_systest::testdata::{dataset_of_file, varied_set};
use kakehashi_systest::*;

/// SOP Instance UID → dataset bytes, for a set of Part 10 files.
fn datasets(files: impl IntoIterator<Item = Vec<u8>>) -> HashMap<String, Vec<u8>> {
    files
        .into_iter()
        .map(|bytes| {
            let uid = sop_instance_of_file(&bytes).expect("meta header with SOP Instance UID");
            let ds = dataset_of_file(&bytes).expect("Part 10 file").to_vec();
            (uid, ds)
        })
        .collect()
}

fn originals(files: &[PathBuf]) -> HashMap<String, (PathBuf, Vec<u8>)> {
    files
        .iter()
        .map(|f| {
            let bytes = read(f);
            (
                sop_instance_of_file(&bytes).expect("uid"),
                (f.clone(), dataset_of_file(&bytes).expect("ds").to_vec()),
            )
        })
        .collect()
}

/// What storescu puts on the wire, measured by sending straight to storescp.
/// (For deflated files DCMTK re-deflates, so the wire bytes differ from the file's.)
fn direct_reference(files: &[PathBuf]) -> HashMap<String, Vec<u8>> {
    let scp = StoreScp::start(free_port());
    let out = storescu_to(scp.port, "MODALITY1", "READCENTER", files);
    assert_eq!(
        out.acked.len(),
        files.len(),
        "direct send failed:\n{}",
        out.output
    );
    datasets(scp.files().iter().map(|p| read(p)))
}

#[test]
fn storescu_to_storescp_datasets_arrive_byte_identical() {
    let data = tempfile::tempdir().expect("tempdir");
    let files = varied_set(data.path()).expect("test data");
    let reference = direct_reference(&files);
    let originals = originals(&files);

    let center = StoreScp::start(free_port());
    let relay = Relay::start(RelayOptions::to(center.port));
    let out = storescu(relay.port, "MODALITY1", &files);
    assert_eq!(
        out.acked.len(),
        files.len(),
        "every file acknowledged:\n{}",
        out.output
    );
    relay.wait_drained(Duration::from_secs(120));

    let arrived = datasets(center.files().iter().map(|p| read(p)));
    assert_eq!(arrived.len(), files.len(), "every instance arrived once");
    let mut same_as_file = 0;
    for (uid, (path, original)) in &originals {
        let got = arrived
            .get(uid)
            .unwrap_or_else(|| panic!("{} never arrived", path.display()));
        let sent = &reference[uid];
        assert!(
            got == sent,
            "{}: dataset differs from what storescu sent ({} vs {} bytes)",
            path.display(),
            got.len(),
            sent.len()
        );
        if got == original {
            same_as_file += 1;
        }
    }
    // Only the deflated files are re-encoded by DCMTK's storescu itself.
    let deflated = files
        .iter()
        .filter(|f| f.to_string_lossy().contains("deflate"))
        .count();
    assert_eq!(
        same_as_file,
        files.len() - deflated,
        "non-deflated datasets equal the original files byte for byte"
    );
    assert_eq!(center.store_requests(), files.len(), "nothing sent twice");
}

#[test]
fn storescu_to_orthanc_datasets_arrive_byte_identical() {
    let data = tempfile::tempdir().expect("tempdir");
    let files = varied_set(data.path()).expect("test data");
    let originals = originals(&files);

    let orthanc = Orthanc::start();
    let relay = Relay::start(RelayOptions::to(orthanc.dicom_port));
    let out = storescu(relay.port, "MODALITY1", &files);
    assert_eq!(
        out.acked.len(),
        files.len(),
        "every file acknowledged:\n{}",
        out.output
    );
    relay.wait_drained(Duration::from_secs(120));

    let ids = orthanc.instance_ids();
    assert_eq!(ids.len(), files.len(), "Orthanc holds every instance");
    let arrived = datasets(ids.iter().map(|id| orthanc.instance_file(id)));
    let mut compared = 0;
    for (uid, (path, original)) in &originals {
        let got = arrived
            .get(uid)
            .unwrap_or_else(|| panic!("{} never reached Orthanc", path.display()));
        if path.to_string_lossy().contains("deflate") {
            continue; // storescu re-deflates on the wire; Orthanc stores what it decoded
        }
        assert!(
            got == original,
            "{}: dataset stored by Orthanc differs ({} vs {} bytes)",
            path.display(),
            got.len(),
            original.len()
        );
        compared += 1;
    }
    let deflated = files
        .iter()
        .filter(|f| f.to_string_lossy().contains("deflate"))
        .count();
    assert_eq!(
        compared,
        files.len() - deflated,
        "every dataset but the re-deflated ones compared byte for byte"
    );
}
