//! RFC 6062 TCP allocations: Connect, peers connecting to the relay,
//! ConnectionBind, and the peer connections' bookkeeping and deadlines.

/// How long a Connect may take before 447 (RFC 6062 §5.2).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

use super::*;

impl Server {
    pub(super) fn is_stream(&self, key: &ClientKey) -> bool {
        self.listeners.get(usize::from(key.listener.0)) == Some(&ListenerKind::Stream)
    }

    pub(super) fn new_connection_id(&mut self) -> u32 {
        loop {
            self.next_connection = (self.next_connection + 1) & 0x00FF_FFFF;
            let id = (u32::from(self.config.worker_index) << 24) | self.next_connection;
            if !self.tcp_connections.contains_key(&id) {
                return id;
            }
        }
    }

    /// Connect (RFC 6062 §5.2): the answer comes when the driver reports
    /// whether the TCP connection to the peer was established.
    pub(super) fn connect(&mut self, now: Instant, id: usize, msg: &Message<'_>) -> RequestResult {
        let a = self.allocations.get(id).ok_or(BAD_REQUEST)?;
        if !a.tcp {
            return Err(BAD_REQUEST);
        }
        let peer = match msg.xor_peer_addresses().next() {
            Some(Ok(p)) => p,
            _ => return Err(BAD_REQUEST),
        };
        let relay = a.relay_for(&peer).ok_or(Refusal::FamilyMismatch)?.id;
        // The same rule as for UDP peers: CVE-2020-26262 came through this path.
        permissions::counted(&mut self.stats, &peer, self.realms.get(a.realm).policy.check(&peer))
            .map_err(|_| Refusal::Forbidden)?;
        if a.connections >= self.config.max_connections {
            return Err(Refusal::TooManyConnections);
        }
        if self.tcp_connections.values().any(|c| c.alloc == id && c.peer == peer) {
            return Err(Refusal::ConnectionExists);
        }
        let connection = self.new_connection_id();
        if let Some(a) = self.allocations.get_mut(id) {
            a.connections += 1;
        }
        let deadline = now + CONNECT_TIMEOUT;
        let state = TcpConnectionState::Connecting {
            tid: *msg.transaction_id(),
            fingerprint: msg.has_fingerprint(),
            deadline,
        };
        self.tcp_connections
            .insert(connection, TcpConnection { alloc: id, peer, state });
        self.schedule_connection(connection, deadline);
        let peer = self.route(peer);
        self.outputs.push_back(Output::TcpConnect {
            relay,
            peer,
            connection,
        });
        Ok(ClientOutcome::Consumed)
    }

    /// The driver's result for an [`Output::TcpConnect`]: the Connect
    /// response (success with CONNECTION-ID, or 447) for the control connection.
    pub(super) fn handle_tcp_connected(
        &mut self,
        now: Now,
        connection: u32,
        connected: bool,
        out: &mut [u8],
    ) -> Option<(ClientKey, usize)> {
        let c = self.tcp_connections.get_mut(&connection)?;
        let TcpConnectionState::Connecting { tid, fingerprint, .. } = c.state else {
            return None;
        };
        let alloc = c.alloc;
        if connected {
            let deadline = now.instant + CONNECTION_BIND_TIMEOUT;
            c.state = TcpConnectionState::AwaitingBind { deadline };
            self.schedule_connection(connection, deadline);
        } else {
            self.forget_connection(connection);
            self.stats.count_error(447);
        }
        let a = self.allocations.get(alloc)?;
        let signing = Signing {
            key: &a.credential,
            suite: a.suite,
        };
        let software = self.config.software.as_deref();
        let written = if connected {
            let mut w = MessageWriter::new(out, Class::Success, Method::CONNECT, tid).ok()?;
            w.connection_id(connection).ok()?;
            finish_success(w, Some(signing), fingerprint, software)?
        } else {
            let r = Refusal::ConnectFailed;
            error_for(tid, Method::CONNECT, r, Some(signing), fingerprint, out)?
        };
        Some((a.key, written))
    }

    /// A peer connected to a TCP relay (RFC 6062 §5.3): with a permission it
    /// gets a connection id and the client a ConnectionAttempt indication
    /// (written into `out`); without one, or beyond the allocation's
    /// connection limit, the driver closes it.
    pub(super) fn handle_tcp_peer_accepted(
        &mut self,
        now: Now,
        relay: RelayId,
        peer: SocketAddr,
        out: &mut [u8],
    ) -> Result<(ClientKey, u32, usize), DropReason> {
        let alloc = self
            .relays
            .get(relay.0 as usize)
            .copied()
            .flatten()
            .ok_or(DropReason::UnknownRelay)?;
        let a = self.allocations.get_mut(alloc).ok_or(DropReason::UnknownRelay)?;
        if !a.tcp || !a.permits(peer.ip(), now.instant) {
            return Err(DropReason::NoPermission);
        }
        if a.connections >= self.config.max_connections {
            return Err(DropReason::ConnectionLimit);
        }
        a.connections += 1;
        let key = a.key;
        let connection = self.new_connection_id();
        let deadline = now.instant + CONNECTION_BIND_TIMEOUT;
        let state = TcpConnectionState::AwaitingBind { deadline };
        self.tcp_connections
            .insert(connection, TcpConnection { alloc, peer, state });
        self.schedule_connection(connection, deadline);
        let tid = TransactionId(indication_tid(&mut self.stats));
        let written = (|| {
            let mut w = MessageWriter::new(out, Class::Indication, Method::CONNECTION_ATTEMPT, tid).ok()?;
            w.xor_peer_address(&peer).ok()?;
            w.connection_id(connection).ok()?;
            Some(w.finish())
        })();
        match written {
            Some(len) => Ok((key, connection, len)),
            None => {
                self.forget_connection(connection);
                Err(DropReason::OutputTooSmall)
            }
        }
    }

    /// ConnectionBind (RFC 6062 §5.4) on a new client connection.
    pub(super) fn connection_bind(
        &mut self,
        key: ClientKey,
        alloc_id: Option<usize>,
        msg: &Message<'_>,
        (realm, username): (RealmIndex, &str),
        signing: Signing<'_>,
        out: &mut [u8],
    ) -> RequestResult {
        // Only a fresh TCP/TLS connection can become a data connection.
        if !self.is_stream(&key) || alloc_id.is_some() {
            return Err(BAD_REQUEST);
        }
        let connection = match msg.connection_id() {
            Ok(Some(c)) => c,
            _ => return Err(BAD_REQUEST),
        };
        let c = self.tcp_connections.get(&connection).ok_or(BAD_REQUEST)?;
        if !matches!(c.state, TcpConnectionState::AwaitingBind { .. }) {
            return Err(BAD_REQUEST);
        }
        if self
            .allocations
            .get(c.alloc)
            .is_none_or(|a| a.username != username || a.realm != realm)
        {
            return Err(Refusal::WrongCredentials);
        }
        if let Some(c) = self.tcp_connections.get_mut(&connection) {
            c.state = TcpConnectionState::Bound;
        }
        let software = self.config.software.as_deref();
        match success_response(msg, signing, software, out, |_| Ok(())) {
            Some(len) => Ok(ClientOutcome::ConnectionBound { connection, len }),
            None => Ok(ClientOutcome::Drop(DropReason::OutputTooSmall)),
        }
    }

    /// Removes a peer connection and gives its place in the allocation's
    /// count back.
    pub(super) fn forget_connection(&mut self, connection: u32) {
        if let Some(c) = self.tcp_connections.remove(&connection)
            && let Some(a) = self.allocations.get_mut(c.alloc)
        {
            a.connections = a.connections.saturating_sub(1);
        }
    }
}
