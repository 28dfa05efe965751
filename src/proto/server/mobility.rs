//! RFC 8016 mobility: an allocation asked for with an empty MOBILITY-TICKET
//! gets a ticket; a Refresh from a new 5-tuple carrying it, signed by the
//! same user, moves the allocation there (relayed address, permissions and
//! channels kept) and gets a fresh ticket, so the old one is spent.
//!
//! A ticket is the issuing worker, a 64-bit id drawn from a keyed hash (not
//! guessable) and a MAC over both and the user name, under a key every
//! worker shares: any worker recognises a ticket, a forged one fails the
//! MAC, another user's fails it too (441), and a spent or expired one names
//! no allocation (437). A ticket of another worker is the driver's to fetch
//! ([`ClientOutcome::AllocationElsewhere`]).

use hmac::Mac;

use super::*;

/// Ticket: version, worker, id (8), MAC (20) — 30 bytes, sent as 40
/// characters of URL-safe base64: clients (coturn's among them) keep a
/// ticket as a C string, so it holds no zero byte, and 40 is a multiple of
/// 4, so padding is never taken for part of it.
const TICKET_LEN: usize = 40;
const RAW_LEN: usize = 30;
const HEAD_LEN: usize = 10;
const TICKET_VERSION: u8 = 1;

impl Server {
    /// A fresh, unguessable id for an allocation's ticket.
    pub(super) fn new_mobility_id(&mut self) -> u64 {
        loop {
            self.mobility_counter += 1;
            let mut mac = self.mobility_key.clone();
            mac.update(b"id");
            mac.update(&[self.config.worker_index]);
            mac.update(&self.mobility_counter.to_be_bytes());
            let full = mac.finalize().into_bytes();
            let mut id = [0u8; 8];
            id.copy_from_slice(full.get(..8).unwrap_or(&[0; 8]));
            let id = u64::from_be_bytes(id);
            if id != 0 && !self.by_mobility.contains_key(&id) {
                return id;
            }
        }
    }

    fn ticket_mac(&self, head: &[u8], username: &str) -> [u8; RAW_LEN - HEAD_LEN] {
        let mut mac = self.mobility_key.clone();
        mac.update(head);
        mac.update(username.as_bytes());
        let full = mac.finalize().into_bytes();
        let mut t = [0u8; RAW_LEN - HEAD_LEN];
        t.copy_from_slice(full.get(..RAW_LEN - HEAD_LEN).unwrap_or(&[0; RAW_LEN - HEAD_LEN]));
        t
    }

    /// The MOBILITY-TICKET of allocation id `id` for `username`.
    pub(super) fn ticket(&self, id: u64, username: &str) -> [u8; TICKET_LEN] {
        use base64::Engine;
        let mut raw = [0u8; RAW_LEN];
        let head = [TICKET_VERSION, self.config.worker_index]
            .into_iter()
            .chain(id.to_be_bytes());
        for (d, s) in raw.iter_mut().zip(head) {
            *d = s;
        }
        let (head, tag) = raw.split_at_mut(HEAD_LEN);
        tag.copy_from_slice(&self.ticket_mac(head, username));
        let mut t = [0u8; TICKET_LEN];
        let _ = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_slice(raw, &mut t);
        t
    }

    /// The worker and id a ticket names, if it is ours and `username`'s.
    fn open_ticket(&self, ticket: &[u8], username: &str) -> Option<(u8, u64)> {
        use base64::Engine;
        if ticket.len() != TICKET_LEN {
            return None;
        }
        let mut raw = [0u8; RAW_LEN];
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode_slice(ticket, &mut raw)
            .ok()?;
        if n != RAW_LEN || raw.first() != Some(&TICKET_VERSION) {
            return None;
        }
        let (head, tag) = raw.split_at(HEAD_LEN);
        if !crate::proto::stun::integrity::ct_eq(&self.ticket_mac(head, username), tag) {
            return None;
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(head.get(2..10)?);
        Some((*head.get(1)?, u64::from_be_bytes(id)))
    }

    /// The ticket of allocation `id`, if it has one.
    pub(super) fn ticket_of(&self, id: usize) -> Option<[u8; TICKET_LEN]> {
        let a = self.allocations.get(id)?;
        a.mobility.map(|m| self.ticket(m, &a.username))
    }

    /// A Refresh from a 5-tuple without an allocation, carrying a
    /// MOBILITY-TICKET: moves the allocation it names here, then refreshes.
    pub(super) fn mobility_refresh(
        &mut self,
        now: Now,
        key: ClientKey,
        msg: &Message<'_>,
        (realm, username): (RealmIndex, &str),
        signing: Signing<'_>,
        out: &mut [u8],
    ) -> RequestResult {
        if !self.config.mobility {
            return Err(Refusal::MobilityForbidden);
        }
        let ticket = msg.find(kind::MOBILITY_TICKET).unwrap_or_default();
        let Some((worker, mobility)) = self.open_ticket(ticket, username) else {
            tracing::info!(client = %key.client, user = username, "mobility refused: the ticket is not this user's");
            return Err(Refusal::WrongCredentials);
        };
        // Here already (issued here, or fetched from its worker), or to be
        // fetched from the worker that issued the ticket.
        let Some(id) = self.by_mobility.get(&mobility).copied() else {
            if worker != self.config.worker_index {
                return Ok(ClientOutcome::AllocationElsewhere {
                    worker: usize::from(worker),
                    mobility,
                });
            }
            return Err(Refusal::AllocationMismatch);
        };
        if self.allocations.get(id).is_some_and(|a| a.realm != realm) {
            // The same user name in another realm is another user.
            tracing::info!(client = %key.client, user = username, "mobility refused: the ticket is another realm's");
            return Err(Refusal::WrongCredentials);
        }
        if self.is_stream(&key) != self.allocations.get(id).is_some_and(|a| self.is_stream(&a.key)) {
            // Its relaying is framed for the transport it was made on.
            return Err(Refusal::BadRequest);
        }
        self.move_allocation(id, key, now.instant);
        self.refresh(now, id, msg, signing, out)
    }

    /// Takes allocation `id` to 5-tuple `key` with a new ticket id.
    fn move_allocation(&mut self, id: usize, key: ClientKey, now: Instant) {
        let fresh = self.new_mobility_id();
        let Some(a) = self.allocations.get_mut(id) else {
            return;
        };
        let old = a.key;
        if let Some(m) = a.mobility.replace(fresh) {
            self.by_mobility.remove(&m);
        }
        a.key = key;
        let (user, traffic) = (a.username.clone(), a.traffic);
        self.by_mobility.insert(fresh, id);
        self.by_client.remove(&old);
        self.by_client.insert(key, id);
        self.stats.allocations_moved += 1;
        tracing::info!(from = %old.client, to = %key.client, user = %user, "allocation moved (mobility)");
        // For drivers that mirror the core: the old 5-tuple's state is gone,
        // the new one's is there.
        self.outputs.push_back(Output::AllocationEnded {
            key: old,
            reason: EndReason::Moved,
            traffic,
        });
        self.announce(id, now);
    }

    /// Reports an allocation as created, with its permissions and live
    /// channels (after a restore or a move).
    pub(super) fn announce(&mut self, id: usize, now: Instant) {
        let Some(a) = self.allocations.get(id) else {
            return;
        };
        let live_channels = a.channels.iter().filter(|c| c.expires > now);
        let key = a.key;
        let mut events = vec![Output::AllocationCreated {
            key,
            user: a.username.clone(),
            realm: self.realms.get(a.realm).name().to_owned(),
            relays: a.relays.map(|x| x.map(|x| (x.id, x.bound))),
            expires: a.expires,
        }];
        events.extend(a.permissions.iter().map(|p| Output::PermissionInstalled {
            key,
            peer: p.ip,
            expires: p.expires,
        }));
        events.extend(live_channels.filter_map(|c| {
            a.relay_for(&c.peer).map(|relay| Output::ChannelBound {
                key,
                relay: relay.id,
                channel: c.number,
                peer: c.peer,
                expires: c.expires,
            })
        }));
        self.outputs.extend(events);
    }
}

impl Server {
    /// RFC 8016, on the worker holding the allocation a ticket names: gives
    /// it up for the worker the client's new 5-tuple reaches. The driver
    /// takes its relay sockets (before carrying out the outputs, which
    /// close this worker's copies). `None`: no such allocation (spent
    /// ticket, expired, or an RFC 6062 one, which stays).
    pub fn lend(&mut self, mobility: u64, at: Instant, unix_ms: u64) -> Option<snapshot::Snapshot> {
        let id = *self.by_mobility.get(&mobility)?;
        let a = self.allocations.get(id)?;
        if a.tcp {
            return None;
        }
        let key = a.key;
        let lent = self.export(at, unix_ms, |k| *k == key);
        self.release_handed_over(|k| *k == key);
        Some(lent)
    }

    /// RFC 8016, on the worker the new 5-tuple reaches: takes the
    /// allocations another worker lent, under relay ids of this worker's;
    /// returns (lender's id, id here) for each relay socket.
    pub fn adopt(&mut self, lent: snapshot::Snapshot, at: Instant, unix_ms: u64) -> Vec<(RelayId, RelayId)> {
        let r = snapshot::Rebase::new(at, unix_ms, lent.taken_unix_ms);
        let mut moved = Vec::new();
        let mut realms = lent.realms.into_iter();
        for s in lent.allocations {
            let realm = realms.next().unwrap_or_default();
            let key = ClientKey {
                listener: ListenerId(s.listener),
                client: s.client,
            };
            if self.by_client.contains_key(&key) || s.tcp {
                continue;
            }
            let Some(mut a) = snapshot::restore_allocation(&s, &realm, key, r, &self.realms) else {
                continue;
            };
            let mut pairs = Vec::new();
            for relay in a.relays.iter_mut().flatten() {
                let here = RelayId(self.relays.insert(None) as u32);
                pairs.push((relay.id, here));
                relay.id = here;
            }
            let id = self.take_in(a, at);
            for (_, here) in &pairs {
                if let Some(slot) = self.relays.get_mut(here.0 as usize) {
                    *slot = Some(id);
                }
            }
            moved.extend(pairs);
        }
        moved
    }
}
