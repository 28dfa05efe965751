//! Allocate (relay sockets bound through the driver, retries on other
//! ports, the success response), Refresh, and an allocation's end.

use super::*;

pub(super) fn write_allocate_body(
    w: &mut MessageWriter<'_>,
    a: &Allocation,
    lifetime: u32,
    family_error: Option<AddressFamily>,
    ticket: Option<&[u8]>,
) -> Result<(), BufferTooSmall> {
    for r in a.relays.iter().flatten() {
        w.xor_relayed_address(&r.advertised)?;
    }
    w.lifetime(lifetime)?;
    if let Some(t) = &a.reservation_token {
        w.reservation_token(t)?;
    }
    w.xor_mapped_address(&a.key.client)?;
    if let Some(f) = family_error {
        w.address_error_code(f, 440, "Address Family not Supported")?;
    }
    if let Some(t) = ticket {
        w.mobility_ticket(t)?;
    }
    Ok(())
}

impl Server {
    pub(super) fn relay_config(&self, f: AddressFamily) -> Option<RelayAddress> {
        match f {
            AddressFamily::V4 => self.config.relay_v4,
            AddressFamily::V6 => self.config.relay_v6,
        }
    }

    pub(super) fn granted_lifetime(&self, requested: Option<u32>) -> u32 {
        let max = self.config.max_lifetime.max(DEFAULT_LIFETIME);
        match requested {
            Some(r) => r.clamp(DEFAULT_LIFETIME, max),
            None => DEFAULT_LIFETIME,
        }
    }

    pub(super) fn allocate(
        &mut self,
        now: Now,
        key: ClientKey,
        msg: &Message<'_>,
        authed: credentials::Authenticated<'_>,
        realm: RealmIndex,
        out: &mut [u8],
    ) -> RequestResult {
        if self.pending_by_client.contains_key(&key) {
            // Its relay sockets are being bound: the answer is on its way.
            return Ok(ClientOutcome::Consumed);
        }
        if let Some(&id) = self.by_client.get(&key) {
            let signing = Signing {
                key: &authed.key,
                suite: authed.suite,
            };
            // A retransmitted Allocate gets its success again (RFC 8656 §7.2).
            if let Some(a) = self.allocations.get(id)
                && a.tid == *msg.transaction_id()
                && a.username == authed.username
            {
                return Ok(write_or_drop(self.allocate_success(msg, id, now, signing, out)));
            }
            return Err(Refusal::AllocationMismatch);
        }
        if let Some(configured) = self.draining {
            return match configured.or(self.fleet_alternate) {
                Some(server) => Ok(self.try_alternate(msg, &authed, server, out)),
                None => Err(Refusal::Draining),
            };
        }
        match msg.requested_transport() {
            Ok(Some(transport::UDP)) => {}
            // RFC 6062: TCP relaying only for clients that reach us over TCP or TLS.
            Ok(Some(transport::TCP)) if self.is_stream(&key) && self.config.tcp_relay => {}
            Ok(Some(_)) => return Err(Refusal::UnsupportedTransport),
            Ok(None) | Err(_) => return Err(BAD_REQUEST),
        }
        let tcp = msg.requested_transport().ok().flatten() == Some(transport::TCP);
        // RFC 8016: an empty MOBILITY-TICKET asks for one.
        let mobility = match msg.find(kind::MOBILITY_TICKET) {
            None => false,
            Some(_) if !self.config.mobility => return Err(Refusal::MobilityForbidden),
            Some([]) => true,
            Some(_) => return Err(BAD_REQUEST),
        };
        let attr = |k| msg.get(k).map_err(|_| BAD_REQUEST);
        let even_port = match attr(kind::EVEN_PORT)? {
            Some(Attribute::EvenPort { reserve }) => Some(reserve),
            _ => None,
        };
        let token = match attr(kind::RESERVATION_TOKEN)? {
            Some(Attribute::ReservationToken(t)) => Some(*t),
            _ => None,
        };
        let requested_family = match attr(kind::REQUESTED_ADDRESS_FAMILY)? {
            Some(Attribute::RequestedAddressFamily(f)) => Some(f),
            _ => None,
        };
        let additional = match attr(kind::ADDITIONAL_ADDRESS_FAMILY)? {
            Some(Attribute::AdditionalAddressFamily(f)) => Some(f),
            _ => None,
        };
        // RFC 8656 §7.2 and RFC 6062 §5.1: combinations that make no sense are 400.
        if (tcp
            && (token.is_some()
                || even_port.is_some()
                || additional.is_some()
                || msg.find(kind::DONT_FRAGMENT).is_some()))
            || (token.is_some() && (even_port.is_some() || requested_family.is_some()))
            || (additional.is_some() && requested_family.is_some())
            || additional.is_some_and(|f| f != AddressFamily::V6)
        {
            return Err(BAD_REQUEST);
        }
        let lifetime = self.granted_lifetime(msg.lifetime().map_err(|_| BAD_REQUEST)?);
        let dont_fragment = msg.find(kind::DONT_FRAGMENT).is_some();

        // Which families, which ports. A reservation token names its family:
        // each family's port pool keys its own tokens.
        let redeemed = match token {
            Some(t) => Some(
                self.ports
                    .iter()
                    .enumerate()
                    .find_map(|(i, p)| p.redeem(&t, now.unix, authed.username).map(|port| (i, port)))
                    .ok_or(Refusal::BadReservationToken)?,
            ),
            None => None,
        };
        let primary = match redeemed {
            Some((1, _)) => AddressFamily::V6,
            Some(_) => AddressFamily::V4,
            None => requested_family.unwrap_or(AddressFamily::V4),
        };
        let fixed_port = redeemed.map(|(_, port)| port);
        if self.relay_config(primary).is_none() {
            return Err(Refusal::FamilyNotSupported);
        }
        let mut family_error = None;
        let mut wanted = vec![primary];
        if let Some(extra) = additional {
            if self.relay_config(extra).is_some() {
                wanted.push(extra);
            } else {
                family_error = Some(extra);
            }
        }

        let realms = Arc::clone(&self.realms);
        let realm_name = realms.get(realm).name();
        if let Err(q) = self.quotas.acquire(realm_name, authed.username, key.client.ip()) {
            self.stats.count_quota_refusal(q);
            tracing::info!(
                client = %key.client,
                user = %authed.username,
                realm = realm_name,
                quota = q.label(),
                "allocation refused: quota reached"
            );
            // The total quota counts the whole fleet: no other node has room either.
            return Err(match q {
                QuotaRefusal::User | QuotaRefusal::Realm => Refusal::UserQuota,
                QuotaRefusal::Address => Refusal::IpQuota,
                QuotaRefusal::Total => Refusal::TotalQuota,
            });
        }
        // EVEN-PORT with R reserves the next port of the primary family's relay.
        let reserve_pair = even_port == Some(true);
        let mut sockets = [None, None];
        for family in wanted {
            let i = family_index(family);
            let is_primary = family == primary;
            let port = match (fixed_port.filter(|_| is_primary), self.ports.get_mut(i)) {
                (Some(p), Some(ports)) => {
                    ports.take_specific(p);
                    Some(p)
                }
                (None, Some(ports)) => ports.take(now.instant, even_port.is_some(), reserve_pair && is_primary),
                (_, None) => None,
            };
            let (Some(port), Some(bind)) = (port, self.relay_config(family)) else {
                self.abandon(&sockets, realm, authed.username, key.client.ip());
                // This node is full: another node of the fleet may have room.
                return match self.fleet_alternate {
                    Some(server) => Ok(self.try_alternate(msg, &authed, server, out)),
                    None => Err(Refusal::NoRelayPort),
                };
            };
            let rid = RelayId(self.relays.insert(None) as u32);
            if let Some(slot) = sockets.get_mut(i) {
                *slot = Some((rid, SocketAddr::new(bind.bind, port)));
            }
        }
        let dont_fragment_socket = dont_fragment;
        let pid = self.pending.insert(PendingAllocate {
            key,
            tid: *msg.transaction_id(),
            username: authed.username.to_owned(),
            realm,
            credential: authed.key.clone(),
            algorithm: authed.algorithm,
            suite: authed.suite,
            rest_expiry: authed.rest_expiry,
            fingerprint: msg.has_fingerprint(),
            lifetime,
            sockets,
            bound: [false; 2],
            family_error,
            even_port: even_port.is_some(),
            reserve_pair,
            primary: family_index(primary),
            fixed_port: fixed_port.is_some(),
            dont_fragment,
            tcp,
            mobility,
            attempts: 1,
            results: [None, None],
        });
        self.pending_by_client.insert(key, pid);
        for (rid, addr) in sockets.iter().flatten() {
            self.pending_by_relay.insert(*rid, pid);
            self.outputs.push_back(Output::BindRelay {
                relay: *rid,
                addr: *addr,
                dont_fragment: dont_fragment_socket,
                tcp,
            });
        }
        Ok(ClientOutcome::Consumed)
    }

    /// Gives back ports, relay ids and the quota taken for an Allocate that failed.
    pub(super) fn abandon(
        &mut self,
        sockets: &[Option<(RelayId, SocketAddr)>; 2],
        realm: RealmIndex,
        username: &str,
        ip: IpAddr,
    ) {
        for (s, ports) in sockets.iter().zip(self.ports.iter_mut()) {
            if let Some((rid, addr)) = s {
                ports.release(addr.port());
                self.relays.try_remove(rid.0 as usize);
            }
        }
        self.quotas.release(self.realms.get(realm).name(), username, ip);
    }

    /// The driver's answer for one relay socket of a pending Allocate. Once
    /// every socket of the round has an answer, the Allocate is answered,
    /// or the sockets that met EADDRINUSE try other ports.
    pub(super) fn relay_bound(&mut self, now: Now, relay: RelayId, result: BindResult) {
        let Some(pid) = self.pending_by_relay.get(&relay).copied() else {
            return;
        };
        let Some(p) = self.pending.get_mut(pid) else {
            return;
        };
        let Some(i) = p.sockets.iter().position(|s| s.is_some_and(|(r, _)| r == relay)) else {
            return;
        };
        if let Some(r) = p.results.get_mut(i) {
            *r = Some(result);
        }
        let waiting = p
            .sockets
            .iter()
            .zip(p.bound.iter().zip(p.results.iter()))
            .any(|(s, (bound, r))| s.is_some() && !bound && r.is_none());
        if waiting {
            return;
        }
        let p = self.pending.remove(pid);
        self.pending_by_client.remove(&p.key);
        for (rid, _) in p.sockets.iter().flatten() {
            self.pending_by_relay.remove(rid);
        }
        let key = p.key;
        let mut out = [0u8; 1500];
        if let Some(len) = self.finish_allocate(now, p, &mut out) {
            let outcome = ClientOutcome::Reply { len };
            self.count_response(&outcome, &out);
            self.transmit(key, out.get(..len).unwrap_or_default());
        }
    }

    /// Answers a pending Allocate whose round of binds is complete: the
    /// response's length in `out`, or `None` while sockets retry other ports.
    pub(super) fn finish_allocate(&mut self, now: Now, mut p: PendingAllocate, out: &mut [u8]) -> Option<usize> {
        let results = std::mem::take(&mut p.results);
        let mut retry = [None, None];
        let mut failed = false;
        let can_retry = !p.fixed_port && p.attempts < MAX_BIND_ATTEMPTS;
        let slots = p.sockets.iter_mut().zip(p.bound.iter_mut()).zip(retry.iter_mut());
        let pools = results.iter().zip(self.ports.iter_mut()).enumerate();
        for (((socket, bound), retry), (i, (result, ports))) in slots.zip(pools) {
            let (Some((rid, addr)), Some(result)) = (*socket, *result) else {
                continue;
            };
            match result {
                BindResult::Bound => *bound = true,
                BindResult::InUse if can_retry => {
                    ports.hold_busy(now.instant, addr.port());
                    match ports.take(now.instant, p.even_port, p.reserve_pair && i == p.primary) {
                        Some(port) => {
                            let next = SocketAddr::new(addr.ip(), port);
                            *socket = Some((rid, next));
                            *retry = Some((rid, next));
                        }
                        None => failed = true,
                    }
                }
                BindResult::InUse | BindResult::Failed => failed = true,
            }
        }
        let signing_key = p.credential.clone();
        let signing = Signing {
            key: &signing_key,
            suite: p.suite,
        };
        if failed {
            for (socket, bound) in p.sockets.iter().zip(p.bound) {
                if let (Some((rid, _)), true) = (socket, bound) {
                    self.outputs.push_back(Output::CloseRelay(*rid));
                }
            }
            self.abandon(&p.sockets, p.realm, &p.username, p.key.client.ip());
            let r = Refusal::NoRelayPort;
            self.stats.count_refusal(r.code(), r.label());
            return error_for(p.tid, Method::ALLOCATE, r, Some(signing), p.fingerprint, out);
        }
        if retry.iter().any(Option::is_some) {
            p.attempts += 1;
            let (key, dont_fragment, tcp) = (p.key, p.dont_fragment, p.tcp);
            let pid = self.pending.insert(p);
            self.pending_by_client.insert(key, pid);
            if let Some(p) = self.pending.get(pid) {
                for (rid, _) in p.sockets.iter().flatten() {
                    self.pending_by_relay.insert(*rid, pid);
                }
            }
            for (relay, addr) in retry.into_iter().flatten() {
                self.outputs.push_back(Output::BindRelay {
                    relay,
                    addr,
                    dont_fragment,
                    tcp,
                });
            }
            return None;
        }

        // Every socket is bound: the allocation exists.
        let relays = p.sockets.map(|s| {
            s.map(|(id, bound)| {
                let f = if bound.is_ipv4() {
                    self.config.relay_v4
                } else {
                    self.config.relay_v6
                };
                let ip = f.and_then(|f| f.external).unwrap_or(bound.ip());
                Relay {
                    id,
                    bound,
                    advertised: SocketAddr::new(ip, bound.port()),
                }
            })
        });
        let reservation_token = match (p.reserve_pair, p.sockets.get(p.primary), self.ports.get(p.primary)) {
            (true, Some(Some((_, a))), Some(ports)) => Some(ports.token(a.port() + 1, now.unix, &p.username)),
            _ => None,
        };
        let expires = now.instant + Duration::from_secs(u64::from(p.lifetime));
        let mobility = p.mobility.then(|| self.new_mobility_id());
        let bandwidth = self.realms.get(p.realm).allocation_bandwidth;
        let id = self.allocations.insert(Allocation {
            key: p.key,
            username: p.username.clone(),
            credential: p.credential,
            algorithm: p.algorithm,
            suite: p.suite,
            rest_expiry: p.rest_expiry,
            tid: p.tid,
            expires,
            relays,
            permissions: Vec::new(),
            channels: Vec::new(),
            reservation_token,
            tcp: p.tcp,
            traffic: allocation::Traffic::default(),
            created: now.instant,
            connections: 0,
            scheduled: None,
            swept: None,
            shaper: (!bandwidth.is_off()).then(|| Box::new([TokenBucket::full(bandwidth, now.instant); 2])),
            bandwidth,
            realm: p.realm,
            mobility,
        });
        if let Some(m) = mobility {
            self.by_mobility.insert(m, id);
        }
        for r in relays.iter().flatten() {
            if let Some(slot) = self.relays.get_mut(r.id.0 as usize) {
                *slot = Some(id);
            }
        }
        self.by_client.insert(p.key, id);
        self.schedule_allocation(id, expires);
        self.stats.allocations_created += 1;
        self.outputs.push_back(Output::AllocationCreated {
            key: p.key,
            user: p.username.clone(),
            realm: self.realms.get(p.realm).name().to_owned(),
            relays: relays.map(|r| r.map(|r| (r.id, r.bound))),
            expires,
        });
        if let Some(a) = self.allocations.get(id) {
            tracing::info!(
                client = %a.key.client,
                user = %a.username,
                relay = ?a.relays.iter().flatten().map(|r| r.advertised).collect::<Vec<_>>(),
                lifetime = p.lifetime,
                transport = self.transport_name(&a.key),
                relay_transport = if a.tcp { "tcp" } else { "udp" },
                "allocation created"
            );
        }

        let family_error = p.family_error;
        let software = self.config.software.as_deref();
        let a = self.allocations.get(id)?;
        let mut w = MessageWriter::new(out, Class::Success, Method::ALLOCATE, p.tid).ok()?;
        let ticket = self.ticket_of(id);
        write_allocate_body(&mut w, a, p.lifetime, family_error, ticket.as_ref().map(|t| &t[..])).ok()?;
        finish_success(w, Some(signing), p.fingerprint, software)
    }

    /// The success response of an existing allocation (for a retransmitted Allocate).
    pub(super) fn allocate_success(
        &self,
        msg: &Message<'_>,
        id: usize,
        now: Now,
        signing: Signing<'_>,
        out: &mut [u8],
    ) -> Option<usize> {
        let a = self.allocations.get(id)?;
        let remaining = a.expires.saturating_duration_since(now.instant).as_secs() as u32;
        let mut w = MessageWriter::new(out, Class::Success, Method::ALLOCATE, *msg.transaction_id()).ok()?;
        let ticket = self.ticket_of(id);
        write_allocate_body(&mut w, a, remaining, None, ticket.as_ref().map(|t| &t[..])).ok()?;
        finish_success(w, Some(signing), msg.has_fingerprint(), self.config.software.as_deref())
    }

    /// 300 Try Alternate with ALTERNATE-SERVER (RFC 8489 §10): this node
    /// drains or is full, `server` takes the Allocate.
    fn try_alternate(
        &mut self,
        msg: &Message<'_>,
        authed: &crate::proto::server::credentials::Authenticated<'_>,
        server: SocketAddr,
        out: &mut [u8],
    ) -> ClientOutcome {
        self.stats.count_error(300);
        let signing = Signing {
            key: &authed.key,
            suite: authed.suite,
        };
        let written = (|| {
            let mut w = MessageWriter::new(out, Class::Error, Method::ALLOCATE, *msg.transaction_id()).ok()?;
            w.error_code(300, "Try Alternate").ok()?;
            w.alternate_server(&server).ok()?;
            finish_error(w, Some(signing), msg.has_fingerprint())
        })();
        write_or_drop(written)
    }

    pub(super) fn remove_allocation(&mut self, id: usize, why: EndReason) {
        let Some(a) = self.allocations.try_remove(id) else {
            return;
        };
        if let Some(m) = a.mobility {
            self.by_mobility.remove(&m);
        }
        self.outputs.push_back(Output::AllocationEnded {
            key: a.key,
            reason: why,
            traffic: a.traffic,
        });
        let t = a.traffic;
        // A hand-over is not an end for its client: no line per allocation.
        if why != EndReason::HandedOver {
            tracing::info!(
                client = %a.key.client,
                transport = self.transport_name(&a.key),
                user = %a.username,
                relay = ?a.relays.iter().flatten().map(|r| r.advertised).collect::<Vec<_>>(),
                to_peer_packets = t.to_peer_packets,
                to_peer_bytes = t.to_peer_bytes,
                to_client_packets = t.to_client_packets,
                to_client_bytes = t.to_client_bytes,
                reason = why.label(),
                "allocation ended"
            );
        }
        let connections: Vec<u32> = self
            .tcp_connections
            .iter()
            .filter(|(_, c)| c.alloc == id)
            .map(|(cid, _)| *cid)
            .collect();
        for cid in connections {
            self.tcp_connections.remove(&cid);
            self.outputs.push_back(Output::CloseConnection(cid));
        }
        self.by_client.remove(&a.key);
        if why == EndReason::HandedOver {
            // The client's connection went with it, if it has one.
        } else if self.is_stream(&a.key) {
            if why.closes_stream() {
                self.streams.remove(&a.key);
                self.outputs.push_back(Output::CloseClient {
                    key: a.key,
                    reason: CloseReason::AllocationEnded,
                });
            } else {
                // The connection stays with the client, under the idle rule.
                self.schedule_stream(a.key);
            }
        }
        for r in a.relays.iter().flatten() {
            self.relays.try_remove(r.id.0 as usize);
            let i = usize::from(r.bound.is_ipv6());
            if let Some(p) = self.ports.get_mut(i) {
                p.release(r.bound.port());
            }
            self.outputs.push_back(Output::CloseRelay(r.id));
        }
        self.quotas
            .release(self.realms.get(a.realm).name(), &a.username, a.key.client.ip());
    }

    pub(super) fn refresh(
        &mut self,
        now: Now,
        id: usize,
        msg: &Message<'_>,
        signing: Signing<'_>,
        out: &mut [u8],
    ) -> RequestResult {
        let requested = msg.lifetime().map_err(|_| BAD_REQUEST)?;
        if let Some(Attribute::RequestedAddressFamily(f)) =
            msg.get(kind::REQUESTED_ADDRESS_FAMILY).map_err(|_| BAD_REQUEST)?
            && self
                .allocations
                .get(id)
                .is_some_and(|a| a.relays.get(family_index(f)).is_none_or(Option::is_none))
        {
            return Err(Refusal::FamilyMismatch);
        }
        let lifetime = if requested == Some(0) {
            self.stats.allocations_deleted += 1;
            self.remove_allocation(id, EndReason::Deleted);
            0
        } else {
            let lifetime = self.granted_lifetime(requested);
            let expires = now.instant + Duration::from_secs(u64::from(lifetime));
            let names = &self.listener_names;
            if let Some(a) = self.allocations.get_mut(id) {
                a.expires = expires;
                self.outputs
                    .push_back(Output::AllocationRefreshed { key: a.key, expires });
                tracing::info!(
                    client = %a.key.client,
                    transport = names.get(usize::from(a.key.listener.0)).copied().unwrap_or("udp"),
                    user = %a.username,
                    lifetime,
                    "allocation refreshed"
                );
            }
            self.schedule_allocation(id, expires);
            lifetime
        };
        let software = self.config.software.as_deref();
        // RFC 8016: a mobility allocation's refreshes carry its ticket.
        let ticket = if lifetime > 0 { self.ticket_of(id) } else { None };
        Ok(write_or_drop(success_response(msg, signing, software, out, |w| {
            w.lifetime(lifetime)?;
            match &ticket {
                Some(t) => w.mobility_ticket(t),
                None => Ok(()),
            }
        })))
    }
}
