//! Reading a link: v1 and v2 records, frame by frame, every refusal counted and the
//! `Hello` checked against the certificate.

use super::*;

impl LinkReceiver {
    /// The peer's endpoint address (its link listener: quinn uses one socket for both).
    pub fn remote_address(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// The node the peer's verified certificate names.
    pub fn peer_node(&self) -> &str {
        &self.peer_node
    }

    /// The next frame, or `None` when the peer finished the stream. Bytes that are not
    /// a frame are an error (counted); so is a `Hello` naming another node than the
    /// peer's certificate, which also closes the connection.
    pub async fn recv(&mut self) -> Result<Option<FrameV1>, ClusterError> {
        let frame = match self.read_frame().await {
            Ok(frame) => frame,
            Err(ReadError::Link(err)) => return Err(err),
            Err(ReadError::Refused(refusal)) => {
                metrics::counter!("tern_cluster_frames_refused_total", "reason" => refusal.reason())
                    .increment(1);
                tracing::debug!(peer = %self.peer_node, error = %refusal, "frame refused; dropping the link");
                return Err(refusal.into());
            }
        };
        if let Some(FrameV1::Hello { node_id, .. }) = &frame {
            if **node_id != *self.peer_node {
                self.connection
                    .close(IDENTITY_REFUSED.into(), b"hello names another node");
                let detail = format!(
                    "its Hello says {node_id:?} but its certificate names {:?}",
                    self.peer_node
                );
                self.shared
                    .refuse(reason::NODE_ID_MISMATCH, &self.peer_node, &detail);
                return Err(ClusterError::Identity(detail));
            }
        }
        Ok(frame)
    }

    async fn read_frame(&mut self) -> Result<Option<FrameV1>, ReadError> {
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return Ok(Some(frame));
            }
            let Some(record) = self.read_record().await? else {
                return Ok(None);
            };
            self.records
                .decode(&record, &mut self.frames)
                .map_err(ReadError::Refused)?;
        }
    }

    /// The next record's body (v1 or v2), or `None` at the end of the stream.
    async fn read_record(&mut self) -> Result<Option<Vec<u8>>, ReadError> {
        let mut len = [0u8; 4];
        match self.stream.read_exact(&mut len).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(quinn::ReadExactError::FinishedEarly(_)) => {
                return Err(ReadError::Refused(Refusal::Truncated))
            }
            Err(quinn::ReadExactError::ReadError(e)) => return Err(ReadError::Link(link_err(e))),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > FRAME_BYTES_MAX + 1 {
            return Err(ReadError::Refused(Refusal::TooLarge(len)));
        }
        // Grown as bytes arrive: a length prefix alone costs nothing.
        let mut bytes = Vec::with_capacity(len.min(READ_CHUNK_BYTES));
        while bytes.len() < len {
            let want = (len - bytes.len()).min(READ_CHUNK_BYTES);
            match self.stream.read_chunk(want, true).await {
                Ok(Some(chunk)) => bytes.extend_from_slice(&chunk.bytes),
                Ok(None) => return Err(ReadError::Refused(Refusal::Truncated)),
                Err(e) => return Err(ReadError::Link(link_err(e))),
            }
        }
        Ok(Some(bytes))
    }
}
