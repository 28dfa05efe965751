// Headless Chromium for the WebRTC tests: Debian's /usr/bin/chromium,
// driven by playwright-core (never a downloaded browser), and a page on
// http://127.0.0.1 to run in (a secure context, so getUserMedia works).
import http from 'node:http';
import { chromium } from 'playwright-core';

// `spki`: the base64 SHA-256 of the test TLS key's SPKI, pinned for turns:
// (not a blanket "ignore certificate errors").
export async function start({ spki } = {}) {
  const server = http.createServer((_req, res) => {
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end('<!doctype html><title>turnstile relay test</title><p>relay test</p>');
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const url = `http://127.0.0.1:${server.address().port}/`;
  const args = [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--use-fake-device-for-media-stream',
    '--use-fake-ui-for-media-stream',
    // WebRTC ignores loopback addresses unless told otherwise.
    '--allow-loopback-in-peer-connection',
  ];
  if (spki) args.push(`--ignore-certificate-errors-spki-list=${spki}`);
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args });
  return {
    browser,
    url,
    async close() {
      await browser.close();
      server.close();
    },
  };
}
