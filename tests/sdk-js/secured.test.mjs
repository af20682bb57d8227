// A secured sandbox through the real E2B JS SDK: once `POST /init` set an access token, the SDK
// sends it as `X-Access-Token` on every call, and `downloadUrl`/`uploadUrl` sign URLs with the
// JS SDK's own signature code, which must match guestd's check byte for byte.

import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { after, before, test } from 'node:test'

import { ConnectionConfig, Sandbox } from 'e2b'

import { startGuestd } from './guestd.mjs'

const TOKEN = randomBytes(16).toString('hex')

let guestd
let sbx
let dir

before(async () => {
  guestd = await startGuestd()
  dir = mkdtempSync('/tmp/guestd-js-secured-')
  const init = await fetch(`${guestd.url}/init`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ accessToken: TOKEN }),
  })
  assert.equal(init.status, 204)
  // What `Sandbox.create()` builds from the API's answer for a secured sandbox (the API is not
  // called in debug mode, so its answer is written here): the envd version and access token.
  sbx = new Sandbox({
    ...new ConnectionConfig({ sandboxUrl: guestd.url }),
    sandboxId: 'debug_sandbox_id',
    envdVersion: '0.6.13',
    envdAccessToken: TOKEN,
  })
})

after(async () => {
  rmSync(dir, { recursive: true, force: true })
  await guestd?.stop()
})

test('without the token nothing but health answers', async () => {
  assert.equal((await fetch(`${guestd.url}/health`)).status, 204)
  assert.equal((await fetch(`${guestd.url}/files?path=/etc/hostname`)).status, 401)
  const rpc = await fetch(`${guestd.url}/process.Process/List`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: '{}',
  })
  assert.equal(rpc.status, 401)
})

test('the SDK sends the token on commands and file calls', async () => {
  const r = await sbx.commands.run('echo secured')
  assert.equal(r.stdout, 'secured\n')
  const path = join(dir, 'via-sdk.txt')
  await sbx.files.write(path, 'written')
  assert.equal(await sbx.files.read(path), 'written')
})

test('a signed download URL works without the token; a forged one does not', async () => {
  const path = join(dir, 'signed-download.txt')
  writeFileSync(path, 'signed body')
  const url = await sbx.downloadUrl(path, { user: 'root' })
  assert.match(url, /[?&]signature=v1_/)
  const res = await fetch(url)
  assert.equal(res.status, 200)
  assert.equal(await res.text(), 'signed body')

  const forged = new URL(url)
  forged.searchParams.set('path', join(dir, 'other.txt'))
  assert.equal((await fetch(forged)).status, 401)
})

test('a signed upload URL takes a multipart body without the token', async () => {
  const path = join(dir, 'signed-upload.txt')
  const url = await sbx.uploadUrl(path, { user: 'root', useSignatureExpiration: 60 })
  assert.match(url, /[?&]signature_expiration=\d+/)
  const form = new FormData()
  form.append('file', new Blob(['uploaded through a signed URL']), 'ignored-name.txt')
  const res = await fetch(url, { method: 'POST', body: form })
  assert.equal(res.status, 200, await res.clone().text())
  const [entry] = await res.json()
  assert.equal(entry.path, path)
  assert.equal(readFileSync(path, 'utf8'), 'uploaded through a signed URL')
})
