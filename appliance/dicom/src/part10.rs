//! The Part 10 file meta header placed in front of a spooled dataset, so a
//! payload file is an ordinary DICOM file (`dcmdump`, `storescu` can read it
//! in an emergency). The dataset after it is exactly the bytes received.

fn element(out: &mut Vec<u8>, elem: u16, vr: &[u8; 2], value: &[u8], pad: u8) {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(pad);
    }
    out.extend_from_slice(&0x0002u16.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(vr);
    if vr == b"OB" {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(v.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(&v);
}

/// Preamble, `DICM` and group 0002 for one instance.
pub fn file_meta(
    sop_class: &str,
    sop_instance: &str,
    transfer_syntax: &str,
    source_ae: &str,
) -> Vec<u8> {
    let mut group = Vec::new();
    element(&mut group, 0x0001, b"OB", &[0, 1], 0);
    element(&mut group, 0x0002, b"UI", sop_class.as_bytes(), 0);
    element(&mut group, 0x0003, b"UI", sop_instance.as_bytes(), 0);
    element(&mut group, 0x0010, b"UI", transfer_syntax.as_bytes(), 0);
    element(
        &mut group,
        0x0012,
        b"UI",
        crate::IMPLEMENTATION_CLASS_UID.as_bytes(),
        0,
    );
    element(
        &mut group,
        0x0013,
        b"SH",
        crate::IMPLEMENTATION_VERSION_NAME.as_bytes(),
        b' ',
    );
    element(&mut group, 0x0016, b"AE", source_ae.as_bytes(), b' ');
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    out.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0]);
    out.extend_from_slice(&(group.len() as u32).to_le_bytes());
    out.extend_from_slice(&group);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn header_is_even_and_self_describing() {
        let h = super::file_meta(
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.3",
            "1.2.840.10008.1.2.1",
            "CT1",
        );
        assert_eq!(&h[128..132], b"DICM");
        assert_eq!(h.len() % 2, 0);
        let gl = u32::from_le_bytes([h[140], h[141], h[142], h[143]]) as usize;
        assert_eq!(gl, h.len() - 144);
    }
}
