//! Numbers with a fixed meaning on the wire: frame actions, presence actions and flag bits.

/// `ProtocolMessage.action` values (Ably spec TR2).
///
/// The field stays a plain `u8` rather than an enum so that a frame with an action this
/// table does not know still decodes and can be answered with an error.
pub mod action {
    /// Both ways: a ping carrying `id` (echoed back), or a bare server keep-alive.
    pub const HEARTBEAT: u8 = 0;
    /// Server to client: frames `msgSerial..msgSerial+count` were accepted.
    pub const ACK: u8 = 1;
    /// Server to client: frames `msgSerial..msgSerial+count` were rejected with `error`.
    pub const NACK: u8 = 2;
    /// Unused by the SDKs.
    pub const CONNECT: u8 = 3;
    /// Server to client: the connection is up; carries `connectionDetails`.
    pub const CONNECTED: u8 = 4;
    /// Client to server: the client is dropping the transport and will resume.
    pub const DISCONNECT: u8 = 5;
    /// Server to client: the server is dropping the transport; the client resumes.
    pub const DISCONNECTED: u8 = 6;
    /// Client to server: close the connection for good.
    pub const CLOSE: u8 = 7;
    /// Server to client: reply to `CLOSE`.
    pub const CLOSED: u8 = 8;
    /// Server to client: fatal for the connection, or for `channel` when it is set.
    pub const ERROR: u8 = 9;
    /// Client to server: attach to `channel`.
    pub const ATTACH: u8 = 10;
    /// Server to client: `channel` is attached; `flags` carry the granted modes.
    pub const ATTACHED: u8 = 11;
    /// Client to server: detach from `channel`.
    pub const DETACH: u8 = 12;
    /// Server to client: `channel` is detached.
    pub const DETACHED: u8 = 13;
    /// Both ways: presence changes in `presence`.
    pub const PRESENCE: u8 = 14;
    /// Both ways: messages in `messages`.
    pub const MESSAGE: u8 = 15;
    /// Server to client: one page of a presence sync.
    pub const SYNC: u8 = 16;
    /// Client to server: in-band re-auth; server to client: "please re-authenticate".
    pub const AUTH: u8 = 17;
    /// Push activation; ignored.
    pub const ACTIVATE: u8 = 18;
    /// LiveObjects operations; optional.
    pub const OBJECT: u8 = 19;
    /// LiveObjects sync; optional.
    pub const OBJECT_SYNC: u8 = 20;
    /// Message annotations; optional.
    pub const ANNOTATION: u8 = 21;
}

/// `ProtocolMessage.flags` bits (Ably spec TR3).
pub mod flags {
    /// On ATTACHED: a presence SYNC follows.
    pub const HAS_PRESENCE: u64 = 1;
    /// On ATTACHED: backlog (rewind or resume replay) follows.
    pub const HAS_BACKLOG: u64 = 2;
    /// On ATTACHED: continuity with the previous attachment is preserved.
    pub const RESUMED: u64 = 4;
    /// Publish without attaching.
    pub const TRANSIENT: u64 = 16;
    /// Deprecated; still sent by the Python SDK on re-attach. Ignore it.
    pub const ATTACH_RESUME: u64 = 32;
    /// LiveObjects state follows.
    pub const HAS_OBJECTS: u64 = 128;

    /// Mode: may enter presence.
    pub const PRESENCE: u64 = 1 << 16;
    /// Mode: may publish.
    pub const PUBLISH: u64 = 1 << 17;
    /// Mode: receives messages (ably-js checks it on `subscribe()`).
    pub const SUBSCRIBE: u64 = 1 << 18;
    /// Mode: receives presence (ably-js checks it on `presence.get()`).
    pub const PRESENCE_SUBSCRIBE: u64 = 1 << 19;
    /// Mode: may publish annotations.
    pub const ANNOTATION_PUBLISH: u64 = 1 << 21;
    /// Mode: receives annotations.
    pub const ANNOTATION_SUBSCRIBE: u64 = 1 << 22;
    /// Mode: receives LiveObjects updates.
    pub const OBJECT_SUBSCRIBE: u64 = 1 << 24;
    /// Mode: may publish LiveObjects operations.
    pub const OBJECT_PUBLISH: u64 = 1 << 25;

    /// Every mode bit; `flags & MODES_MASK` is the mode part of an ATTACH or ATTACHED.
    pub const MODES_MASK: u64 = PRESENCE
        | PUBLISH
        | SUBSCRIBE
        | PRESENCE_SUBSCRIBE
        | ANNOTATION_PUBLISH
        | ANNOTATION_SUBSCRIBE
        | OBJECT_SUBSCRIBE
        | OBJECT_PUBLISH;

    /// The four core modes (983040), the usual grant when a client asks for none.
    pub const CORE_MODES: u64 = PRESENCE | PUBLISH | SUBSCRIBE | PRESENCE_SUBSCRIBE;
}

/// `PresenceMessage.action` values (Ably spec TP2).
pub mod presence_action {
    /// Not present (used in sync results for departed members).
    pub const ABSENT: u8 = 0;
    /// Present; how members appear in a SYNC and in REST presence.
    pub const PRESENT: u8 = 1;
    /// A member entered.
    pub const ENTER: u8 = 2;
    /// A member left.
    pub const LEAVE: u8 = 3;
    /// A member changed its data.
    pub const UPDATE: u8 = 4;
}

/// `Message.action` values (spec TM5); an absent action means `CREATE`.
pub mod message_action {
    /// A new message.
    pub const CREATE: u8 = 0;
    /// A new version of a message, replacing its content.
    pub const UPDATE: u8 = 1;
    /// A message marked deleted (its last version stays readable).
    pub const DELETE: u8 = 2;
    /// Channel metadata; never sent by clients.
    pub const META: u8 = 3;
    /// The annotation summary of a message; made by the server only.
    pub const SUMMARY: u8 = 4;
    /// Data appended to a message (subscribers get the fragment).
    pub const APPEND: u8 = 5;
}

/// `Annotation.action` values (spec TAN2b).
pub mod annotation_action {
    /// An annotation added.
    pub const CREATE: u8 = 0;
    /// An annotation withdrawn.
    pub const DELETE: u8 = 1;
}

#[cfg(test)]
mod tests {
    use super::flags;

    /// The core-mode grant has the value ably-js was verified against.
    #[test]
    fn core_modes_value() {
        assert_eq!(flags::CORE_MODES, 983_040);
        assert_eq!(flags::CORE_MODES & !flags::MODES_MASK, 0);
        assert_eq!(
            flags::MODES_MASK & 0xffff,
            0,
            "mode bits never overlap the low flags"
        );
    }
}
