//! The UDP client driver: receives batches of datagrams on one listener
//! socket (recvmmsg), hands each to the core, and sends what they relay to
//! peers together once the batch is read (sendmmsg, GSO).

use std::io;
use std::rc::Rc;

use crate::io::executor::{Shared, handle_client, now};
use crate::io::send_queue::SendQueue;
use crate::io::udp::UdpListener;
use crate::proto::server::{ClientKey, ListenerId, Now};

/// Receives client datagrams on one UDP listener and hands them to the
/// core; what they relay to peers leaves together once the batch is read.
pub async fn listen_udp(worker: Shared, id: ListenerId, listener: Rc<UdpListener>) -> io::Result<()> {
    let mut batch = listener.batch();
    let mut queue = SendQueue::new(true);
    loop {
        // The clock is read once per batch, after the receive returns: read
        // before the wait, an idle listener would stamp a datagram with the
        // moment it started waiting (stale nonces, expired credentials and
        // permissions accepted, new ones born expired).
        let mut stamp: Option<Now> = None;
        let mut received = 0;
        listener
            .recv(&mut batch, |client, at, datagram| {
                let now = *stamp.get_or_insert_with(now);
                let key = ClientKey { listener: id, client };
                handle_client(&worker, now, key, datagram, Some((&mut queue, at)));
                received += 1;
            })
            .await?;
        crate::io::coalesce::handled(received);
        if !queue.is_empty() {
            let done = queue.flush(batch.storage());
            worker.borrow_mut().sent.add(done);
        }
    }
}
