//! Writing a link: frames queued and written together (one v2 record when the peer
//! reads v2, compressed between regions), bytes counted by kind.

use super::*;

impl LinkSender {
    /// Compresses v2 records with zstd at `level` (set before the first frame; links
    /// between regions).
    pub fn set_compression(&mut self, level: Option<i32>) {
        self.compress = level;
    }

    /// Counts the bytes each flush writes in `events` and `control`, split by what the
    /// frames were (in proportion to their uncompressed size).
    pub fn set_byte_counters(&mut self, events: metrics::Counter, control: metrics::Counter) {
        self.counters = Some((events, control));
    }

    /// Event frames this link has written (flushed without error) since it opened.
    /// Frames queued on a link whose write then fails are not counted: they were never
    /// sent, and go out again on the next link.
    pub fn events_written(&self) -> u64 {
        self.events_written
    }

    /// Resolves when the link's connection is closed (by either side, or replaced by
    /// the pair's other connection), so an idle sender reconnects before its next write.
    pub async fn closed(&self) {
        self.connection.closed().await;
    }

    /// Whether this link writes v2 records.
    pub fn is_v2(&self) -> bool {
        self.v2.is_some()
    }

    /// Writes one frame now (with whatever was queued before it); returns the bytes
    /// written.
    pub async fn send(&mut self, frame: &FrameV1) -> Result<usize, ClusterError> {
        self.queue(frame).await?;
        self.flush().await
    }

    /// Adds a frame to the next write. A batch that has grown large is written at once.
    /// Refused ([`ClusterError::FrameTooLarge`], nothing queued) when the peer would
    /// refuse the frame for its size.
    pub async fn queue(&mut self, frame: &FrameV1) -> Result<(), ClusterError> {
        let event = matches!(frame, FrameV1::Event(_));
        if self.v2.is_none()
            && self.out.is_empty()
            && self.peer_wire.load(Ordering::SeqCst) >= framing::VERSION_V2
        {
            self.v2 = Some(RecordEncoder::new(self.compress));
        }
        match &mut self.v2 {
            None => {
                let bytes = wire::encode(frame);
                // The peer refuses (and drops the link on) anything over the limit.
                if bytes.len() > FRAME_BYTES_MAX + 1 {
                    return Err(ClusterError::FrameTooLarge(bytes.len()));
                }
                let len = u32::try_from(bytes.len()).map_err(link_err)?;
                let before = self.out.len();
                self.out.extend(len.to_be_bytes());
                self.out.extend(bytes);
                let added = (self.out.len() - before) as u64;
                self.count_pending(event, added);
            }
            Some(encoder) => {
                let size = match frame {
                    FrameV1::Event(e) => e.frame.len(),
                    other => wire::encode(other).len(),
                };
                if size > FRAME_BYTES_MAX {
                    return Err(ClusterError::FrameTooLarge(size));
                }
                // A large frame goes in a record of its own, so no record is over the
                // limit the peer enforces.
                if !encoder.is_empty() && size > framing::BATCH_BYTES_MAX / 2 {
                    self.seal()?;
                }
                let encoder = self.v2.as_mut().expect("v2 checked above");
                let before = encoder.len();
                let after = encoder.push(frame);
                self.count_pending(event, (after - before) as u64);
                if after >= framing::BATCH_BYTES_MAX {
                    self.seal()?;
                }
            }
        }
        if self.out.len() >= framing::BATCH_BYTES_MAX {
            self.flush().await?;
        }
        Ok(())
    }

    fn count_pending(&mut self, event: bool, bytes: u64) {
        if event {
            self.pending.events += bytes;
            self.pending.event_frames += 1;
        } else {
            self.pending.control += bytes;
        }
    }

    /// Ends the v2 batch as a record in `out`.
    fn seal(&mut self) -> Result<(), ClusterError> {
        let Some(encoder) = &mut self.v2 else {
            return Ok(());
        };
        let record = encoder.finish();
        if record.is_empty() {
            return Ok(());
        }
        // The encoder's tables already hold this record's items: a record the peer
        // would refuse cannot be skipped, so the link is dropped (a new one starts
        // with new tables) rather than sent out of step.
        if record.len() > FRAME_BYTES_MAX + 1 {
            return Err(ClusterError::Link(format!(
                "a record of {} bytes is over the limit",
                record.len()
            )));
        }
        let len = u32::try_from(record.len()).map_err(link_err)?;
        self.out.extend(len.to_be_bytes());
        self.out.extend(record);
        Ok(())
    }

    /// Writes everything queued; returns the bytes written.
    pub async fn flush(&mut self) -> Result<usize, ClusterError> {
        self.seal()?;
        if self.out.is_empty() {
            return Ok(0);
        }
        let out = std::mem::take(&mut self.out);
        let pending = std::mem::take(&mut self.pending);
        self.stream.write_all(&out).await.map_err(link_err)?;
        self.events_written += pending.event_frames;
        if let Some((events, control)) = &self.counters {
            let total = out.len() as u64;
            let queued = pending.events + pending.control;
            let event_share = (total * pending.events).checked_div(queued).unwrap_or(0);
            events.increment(event_share);
            control.increment(total - event_share);
        }
        Ok(out.len())
    }

    /// Finishes the stream and waits until the peer has received everything.
    pub async fn finish(mut self) -> Result<(), ClusterError> {
        self.flush().await?;
        self.stream.finish().map_err(link_err)?;
        self.stream.stopped().await.map_err(link_err)?;
        Ok(())
    }
}
