//! Catalogue rows at the link level: bytes that are not a frame (each drops its link,
//! counted by reason) and more streams at once than a node allows.

use super::*;

/// Bytes that are not a frame: each drops its link, counted by reason.
pub(super) async fn link_level_rows(bed: &Bed) {
    let elsewhere = Hub::new(OriginId(origin_of("x")), CoreLimits::default());
    let good = wire::encode(&event_frame(&elsewhere, &key_of("stray"), "stray", 0));
    // Version 2 is wire v2 (`framing.rs`): 3 is one no node speaks.
    let mut other_version = good.clone();
    other_version[0] = 3;
    // A v2 record of an unknown kind, and a v2 compact event that refers to a channel
    // its link never named.
    bed.dropped(
        "v2 record of unknown kind",
        true,
        &length_prefixed(&[2, 9, 0]),
        false,
        "undecodable",
    )
    .await;
    bed.dropped(
        "v2 event naming an unknown channel",
        true,
        &length_prefixed(&[2, 0, 1, 0, 5]),
        false,
        "undecodable",
    )
    .await;
    bed.dropped(
        "wrong version byte",
        true,
        &length_prefixed(&other_version),
        false,
        "version",
    )
    .await;
    bed.dropped("empty frame", true, &length_prefixed(&[]), false, "empty")
        .await;
    bed.dropped(
        "version byte and no body",
        true,
        &length_prefixed(&[wire::VERSION_V1]),
        false,
        "undecodable",
    )
    .await;
    let over = (FRAME_BYTES_MAX as u32 + 2).to_be_bytes();
    bed.dropped(
        "length prefix one over FRAME_BYTES_MAX",
        true,
        &over,
        false,
        "too_large",
    )
    .await;
    bed.dropped(
        "length prefix u32::MAX",
        true,
        &u32::MAX.to_be_bytes(),
        false,
        "too_large",
    )
    .await;
    let mut cut = length_prefixed(&good);
    cut.truncate(cut.len() - 3);
    bed.dropped("truncated body", true, &cut, true, "truncated")
        .await;
    bed.dropped("truncated length prefix", true, &[0, 0], true, "truncated")
        .await;
    let mut trailing = good.clone();
    trailing.push(0);
    bed.dropped(
        "trailing byte inside the length",
        true,
        &length_prefixed(&trailing),
        false,
        "trailing",
    )
    .await;
    bed.dropped(
        "undecodable bincode",
        true,
        &length_prefixed(&[wire::VERSION_V1, 0xff, 0xff, 0xff, 0xff]),
        false,
        "undecodable",
    )
    .await;
    // Heads (variant 4) claiming 2^60 channels (a varint: 0xfd, then a u64): refused
    // by the decode limit, without allocating for them.
    let mut claim = vec![wire::VERSION_V1, 4, 0xfd];
    claim.extend_from_slice(&(1u64 << 60).to_le_bytes());
    bed.dropped(
        "a list claiming 2^60 entries",
        true,
        &length_prefixed(&claim),
        false,
        "undecodable",
    )
    .await;
    // A length announced and never sent holds that link only; others carry on.
    let mut waiting = bed.link().await;
    waiting
        .write_all(&(FRAME_BYTES_MAX as u32).to_be_bytes())
        .await
        .unwrap();
    waiting.write_all(&[wire::VERSION_V1; 100]).await.unwrap();
    bed.probe_new_link("a frame announced at 16 MiB and never sent")
        .await;
    let _ = waiting.reset(0u32.into());

    stream_cap_row(bed).await;
}

/// A peer opens more streams at once than v allows (each holding a frame that has not
/// arrived): past the cap, the next stream cannot open until others end.
async fn stream_cap_row(bed: &Bed) {
    let row = "more streams at once than v allows";
    eprintln!("row: {row}");
    let cap = tern_cluster::link::INBOUND_STREAMS_MAX as usize;
    let mut held = Vec::new();
    let mut waiting = None;
    for _ in 0..=cap {
        let mut opening = Box::pin(bed.e_connection.open_uni());
        match tokio::time::timeout(Duration::from_millis(300), &mut opening).await {
            Ok(link) => {
                let mut link = link.unwrap();
                let mut bytes = framed(&Bed::hello("e"));
                bytes.extend_from_slice(&[0, 0, 4, 0, wire::VERSION_V1]);
                link.write_all(&bytes).await.unwrap();
                held.push(link);
            }
            Err(_) => {
                waiting = Some(opening);
                break;
            }
        }
    }
    // quinn hands back credit for closed streams once an eighth of the window is free,
    // so up to that many may still be counted from earlier rows.
    assert!(
        held.len() <= cap && held.len() >= cap - cap / 8,
        "{row}: {} open at once",
        held.len()
    );
    let waiting = waiting.unwrap_or_else(|| panic!("{row}: a stream past the cap opened"));
    for mut link in held {
        let _ = link.reset(0u32.into());
    }
    let mut link = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap_or_else(|_| panic!("{row}: no stream opened after the others ended"))
        .unwrap();
    link.write_all(&framed(&Bed::hello("e"))).await.unwrap();
    let (probe, name) = bed.next_probe();
    link.write_all(&framed(&probe)).await.unwrap();
    bed.probed(row, &name).await;
    link.finish().unwrap();
}
