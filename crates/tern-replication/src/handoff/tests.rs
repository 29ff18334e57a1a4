use super::*;

fn member(id: &str, region: &str) -> Member {
    Member {
        id: id.into(),
        region: region.into(),
        origin: 0,
    }
}

/// `secs` after the start-up window.
fn at(secs: u64) -> Now {
    HANDOFF_STARTUP + Duration::from_secs(secs)
}

/// Channels of app "a" whose home in r1 is `home` among `nodes`.
fn homed_at(home: &str, nodes: &[Member], count: usize) -> Vec<ChannelKey> {
    (0..)
        .map(|i| ChannelKey::new("a", &format!("c{i}")))
        .filter(|key| {
            routing::home_in(key, super::nodes(&nodes.iter().cloned().collect()), "r1")
                == Some(home)
        })
        .take(count)
        .collect()
}

fn stored(keys: &[ChannelKey]) -> Vec<StoredChannel> {
    keys.iter().map(|k| (k.clone(), vec![(7, 3)])).collect()
}

/// A joiner that outscores the old home is sent exactly the channels it is now home
/// of, by every node that stores them, after the settle time and one page at a time.
#[test]
fn a_joiner_is_sent_the_channels_it_now_homes() {
    let before = vec![member("a", "r1"), member("x", "r2")];
    let after = vec![member("a", "r1"), member("b", "r1"), member("x", "r2")];
    let moved = homed_at("b", &after, 3);
    let stays = homed_at("a", &after, 3);
    let mut handoff: Handoff<u32> = Handoff::default();
    handoff.on_members(&before, &after, at(10));
    assert!(
        handoff.next_read(at(10)).is_none(),
        "not before the settle time"
    );
    let read = handoff.next_read(at(11)).expect("a page to read");
    assert_eq!(read.after, None);
    assert!(handoff.next_read(at(11)).is_none(), "one page at a time");
    let first = handoff.on_page(read.pass, stored(&moved[..2]), Some(1), "a");
    // An update that changes no member (a peer's load) neither restarts the pass
    // nor delays it.
    handoff.on_members(&after, &after, at(11));
    let read = handoff.next_read(at(11)).expect("the next page");
    assert_eq!(read.after, Some(1));
    let mut page = stored(&moved[2..]);
    page.extend(stored(&stays));
    let second = handoff.on_page(read.pass, page, None, "a");
    let sent: Vec<_> = first.into_iter().chain(second).collect();
    assert_eq!(sent.len(), 3, "{sent:?}");
    for ((home, (key, cursor)), want) in sent.iter().zip(&moved) {
        assert_eq!(
            (home.as_str(), key, &cursor[..]),
            ("b", want, &[(7, 3)][..])
        );
    }
    // The same pass runs once more, `HANDOFF_REPEAT` after it started, and then
    // ends.
    assert!(handoff.running());
    assert!(handoff.next_read(at(12)).is_none());
    let read = handoff
        .next_read(at(11) + HANDOFF_REPEAT)
        .expect("the repeat");
    assert_eq!(read.after, None);
    let again = handoff.on_page(read.pass, stored(&moved), None, "a");
    assert_eq!(again.len(), 3);
    assert!(!handoff.running());
    assert!(handoff.next_read(at(60)).is_none());
    // r2's home did not move; the joiner itself sends nothing to itself.
    let mut joiner: Handoff<u32> = Handoff::default();
    joiner.on_members(&before, &after, at(10));
    let read = joiner.next_read(at(11)).unwrap();
    assert!(joiner
        .on_page(read.pass, stored(&moved), None, "b")
        .is_empty());
}

/// The home died: its channels go to the next node of its region.
#[test]
fn a_dead_homes_channels_go_to_the_next() {
    let before = vec![member("a", "r1"), member("b", "r1"), member("x", "r2")];
    let after = vec![member("a", "r1"), member("x", "r2")];
    let lost = homed_at("b", &before, 2);
    let mut handoff: Handoff<u32> = Handoff::default();
    handoff.on_members(&before, &after, at(0));
    let read = handoff.next_read(at(5)).unwrap();
    // x (r2) stores them too: it tells a, the new home in r1.
    let sent = handoff.on_page(read.pass, stored(&lost), None, "x");
    let homes: Vec<&str> = sent.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(homes, ["a", "a"]);
}

/// A member died that was no channel's home: a channel whose stored cursor lists
/// its origin goes to every home (the node that stores it excepted), one whose
/// cursor does not goes nowhere (seed 42821: the dead node's message lay in one
/// home's store only).
#[test]
fn a_channel_naming_a_dead_origin_goes_to_every_home() {
    let with_origin = |id: &str, region: &str, origin| Member {
        origin,
        ..member(id, region)
    };
    let before = vec![
        with_origin("a", "r1", 1),
        with_origin("b", "r1", 2),
        with_origin("x", "r2", 3),
    ];
    let after = vec![with_origin("a", "r1", 1), with_origin("x", "r2", 3)];
    // Channels b was not the home of, so no home moved.
    let kept = homed_at("a", &before, 2);
    let mut handoff: Handoff<u32> = Handoff::default();
    handoff.on_members(&before, &after, at(0));
    let read = handoff.next_read(at(5)).unwrap();
    let page = vec![
        (kept[0].clone(), vec![(1, 4), (2, 1)]),
        (kept[1].clone(), vec![(1, 4), (2, 0)]),
    ];
    let sent = handoff.on_page(read.pass, page, None, "x");
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!((sent[0].0.as_str(), &sent[0].1 .0), ("a", &kept[0]));
    // b restarted (a new incarnation): its old origin's events are named the same way.
    let back = vec![
        with_origin("a", "r1", 1),
        with_origin("b", "r1", 5),
        with_origin("x", "r2", 3),
    ];
    let mut handoff: Handoff<u32> = Handoff::default();
    handoff.on_members(&before, &back, at(0));
    let read = handoff.next_read(at(5)).unwrap();
    let page = vec![(kept[0].clone(), vec![(2, 1)])];
    let homes: Vec<String> = handoff
        .on_page(read.pass, page, None, "x")
        .into_iter()
        .map(|(home, _)| home)
        .collect();
    assert!(homes.contains(&"a".to_string()), "{homes:?}");
}

/// A change during a pass restarts it against the memberships seen; a page read for
/// the old pass is thrown away; a flap back still tells the home of what it missed.
#[test]
fn a_change_during_a_pass_restarts_it() {
    let one = vec![member("a", "r1"), member("x", "r2")];
    let two = vec![member("a", "r1"), member("b", "r1"), member("x", "r2")];
    let three = vec![
        member("a", "r1"),
        member("b", "r1"),
        member("c", "r1"),
        member("x", "r2"),
    ];
    let to_c = homed_at("c", &three, 2);
    let mut handoff: Handoff<u32> = Handoff::default();
    handoff.on_members(&one, &two, at(0));
    let stale = handoff.next_read(at(1)).unwrap();
    handoff.on_members(&two, &three, at(1));
    // The stale page answers nothing and frees the reader.
    assert!(handoff
        .on_page(stale.pass, stored(&to_c), Some(9), "a")
        .is_empty());
    // Restarted, not put off: it was due, so it reads again at once.
    let read = handoff.next_read(at(1)).unwrap();
    assert_eq!(read.after, None, "from the first channel again");
    let sent = handoff.on_page(read.pass, stored(&to_c), None, "a");
    assert_eq!(sent.iter().filter(|(h, _)| h == "c").count(), 2);

    // b joins and leaves again: while it was there, the events of the channels it
    // was home of went to it, so a, their home again, is told of them.
    let to_b = homed_at("b", &two, 2);
    let mut flap: Handoff<u32> = Handoff::default();
    flap.on_members(&one, &two, at(0));
    flap.on_members(&two, &one, at(0));
    assert!(flap.running());
    let read = flap.next_read(at(5)).unwrap();
    let sent = flap.on_page(read.pass, stored(&to_b), None, "x");
    let homes: Vec<&str> = sent.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(homes, ["a", "a"]);
}

/// Under churn a pass keeps restarting; a home that took a channel over and died
/// within it leaves the channel to the home it had before, which missed the events
/// of that while and is told of them (the scaled simulation, seed 2 at 8 s).
#[test]
fn a_home_that_gets_a_channel_back_within_a_pass_is_told_of_it() {
    let one = vec![member("a", "r1"), member("x", "r2")];
    let two = vec![member("a", "r1"), member("b", "r1"), member("x", "r2")];
    let three = vec![
        member("a", "r1"),
        member("b", "r1"),
        member("y", "r2"),
        member("x", "r2"),
    ];
    let four = vec![member("a", "r1"), member("y", "r2"), member("x", "r2")];
    let of_b = homed_at("b", &two, 2);
    let mut handoff: Handoff<u32> = Handoff::default();
    handoff.on_members(&one, &two, at(0));
    handoff.on_members(&two, &three, at(1));
    handoff.on_members(&three, &four, at(2));
    let read = handoff.next_read(at(2)).unwrap();
    let sent = handoff.on_page(read.pass, stored(&of_b), None, "x");
    assert!(
        sent.iter().filter(|(h, _)| h == "a").count() == 2,
        "{sent:?}"
    );
}

/// A home that leaves and comes back within one pass (a restart) is sent its
/// channels: their events went elsewhere meanwhile, and its store may be empty.
#[test]
fn a_home_that_left_and_came_back_is_sent_its_channels() {
    let all = vec![member("a", "r1"), member("b", "r1"), member("x", "r2")];
    let without_b = vec![member("a", "r1"), member("x", "r2")];
    let of_b = homed_at("b", &all, 2);
    let mut handoff: Handoff<u32> = Handoff::default();
    handoff.on_members(&all, &without_b, at(0));
    handoff.on_members(&without_b, &all, at(0) + Duration::from_millis(500));
    assert!(handoff.running(), "b left on the way");
    let read = handoff.next_read(at(1)).unwrap();
    let sent = handoff.on_page(read.pass, stored(&of_b), None, "x");
    let homes: Vec<&str> = sent.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(homes, ["b", "b"]);

    // A restart noticed only as a new incarnation under the same id is the same.
    let restarted: Vec<Member> = all
        .iter()
        .map(|m| Member {
            origin: if m.id == "b" { 2 } else { 0 },
            ..m.clone()
        })
        .collect();
    let mut handoff: Handoff<u32> = Handoff::default();
    handoff.on_members(&all, &restarted, at(0));
    let read = handoff.next_read(at(1)).unwrap();
    let sent = handoff.on_page(read.pass, stored(&of_b), None, "x");
    assert_eq!(sent.len(), 2);
}

/// Under churn (a change every half second), each change restarts the pass but does
/// not put it off: it runs one settle time after the first change.
#[test]
fn churn_does_not_put_a_pass_off() {
    let one = vec![member("a", "r1"), member("x", "r2")];
    let two = vec![member("a", "r1"), member("b", "r1"), member("x", "r2")];
    let three = vec![member("a", "r1"), member("c", "r1"), member("x", "r2")];
    let mut handoff: Handoff<u32> = Handoff::default();
    handoff.on_members(&one, &two, at(0));
    let half = Duration::from_millis(500);
    handoff.on_members(&two, &three, at(0) + half);
    assert!(handoff.next_read(at(0) + half).is_none(), "settling");
    handoff.on_members(&three, &two, at(1));
    let read = handoff
        .next_read(at(1))
        .expect("due one settle time after the first");
    let to_b = homed_at("b", &two, 2);
    let sent = handoff.on_page(read.pass, stored(&to_b), None, "a");
    assert_eq!(sent.iter().filter(|(h, _)| h == "b").count(), 2);
}

/// A node that just started finds its peers: no pass; alone for longer (a cluster
/// of one), a joiner is a handoff.
#[test]
fn finding_peers_at_start_up_is_not_a_handoff() {
    let alone = vec![member("a", "r1")];
    let found = vec![member("a", "r1"), member("b", "r1"), member("x", "r2")];
    let mut handoff: Handoff<u32> = Handoff::default();
    handoff.on_members(&alone, &found, Duration::from_secs(2));
    assert!(!handoff.running());
    handoff.on_members(&alone, &found, HANDOFF_STARTUP);
    assert!(handoff.running());
}

/// A restarted node that took its predecessor's stored events back (origin 2) sends each
/// stored channel listing that origin to every home, once it has found its peers, though
/// finding them at start-up is no handoff; a channel not listing it goes nowhere (seed
/// 131187: the restarted node dropped the channel while idle before any `Heads` named
/// the adopted message, and no other store held it).
#[test]
fn a_restarted_node_names_what_it_adopted_to_every_home() {
    let alone = vec![member("a", "r1")];
    let found = vec![member("a", "r1"), member("b", "r1"), member("x", "r2")];
    let of_a = homed_at("a", &found, 2);
    let mut handoff: Handoff<u32> = Handoff::default();
    handoff.on_adopted(&[2], &alone, Duration::ZERO);
    assert!(
        handoff.next_read(Duration::from_secs(3)).is_none(),
        "alone: no home to tell"
    );
    handoff.on_members(&alone, &found, Duration::from_secs(3));
    assert!(
        handoff.next_read(Duration::from_millis(3_500)).is_none(),
        "settling"
    );
    let read = handoff.next_read(Duration::from_secs(4)).unwrap();
    let page = vec![
        (of_a[0].clone(), vec![(1, 4), (2, 1)]),
        (of_a[1].clone(), vec![(1, 4), (3, 2)]),
    ];
    let sent = handoff.on_page(read.pass, page.clone(), None, "a");
    let homes: Vec<(&str, &ChannelKey)> = sent.iter().map(|(h, (k, _))| (h.as_str(), k)).collect();
    // Its home in r1 is this node; x is its home in r2.
    assert_eq!(homes, [("x", &of_a[0])]);
    // Once more, then done.
    let read = handoff
        .next_read(Duration::from_secs(4) + HANDOFF_REPEAT)
        .unwrap();
    assert_eq!(handoff.on_page(read.pass, page, None, "a").len(), 1);
    assert!(!handoff.running());
    // Nothing adopted: no pass.
    let mut handoff: Handoff<u32> = Handoff::default();
    handoff.on_adopted(&[], &alone, Duration::ZERO);
    assert!(!handoff.running());
}
