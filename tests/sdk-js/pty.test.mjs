// `sandbox.pty` through the real E2B JS SDK against guestd: a terminal of the requested size,
// input, resize, reattach and kill.

import assert from 'node:assert/strict'
import { test } from 'node:test'

import { CommandExitError } from 'e2b'

import { sbx, useFreshGuestd, waitUntil } from './guestd.mjs'

useFreshGuestd()

const encoder = new TextEncoder()
const decoder = new TextDecoder()

/** A PTY whose output accumulates in `screen.text`. */
async function terminal(opts) {
  const screen = { text: '' }
  const handle = await sbx.pty.create({
    cols: 80,
    rows: 24,
    ...opts,
    onData: (data) => {
      screen.text += decoder.decode(data, { stream: true })
    },
  })
  return { handle, screen }
}

test('a PTY has the requested size, echoes input and runs an interactive shell', async () => {
  const { handle, screen } = await terminal({ cols: 123, rows: 45, envs: { GREETING: 'hi-pty' } })
  await sbx.pty.sendInput(handle.pid, encoder.encode('stty size; tty; echo "$GREETING $TERM"; exit 7\n'))
  await assert.rejects(handle.wait(), (e) => {
    assert.ok(e instanceof CommandExitError, `${e}`)
    assert.equal(e.exitCode, 7)
    return true
  })
  assert.match(screen.text, /45 123\r\n/)
  assert.match(screen.text, /\/dev\/pts\/\d+\r\n/)
  assert.match(screen.text, /hi-pty xterm-256color\r\n/)
})

test('resize changes what the program sees', async () => {
  const { handle, screen } = await terminal({})
  await sbx.pty.resize(handle.pid, { cols: 200, rows: 50 })
  await sbx.pty.sendInput(handle.pid, encoder.encode('stty size; exit\n'))
  const r = await handle.wait()
  assert.equal(r.exitCode, 0)
  assert.match(screen.text, /50 200\r\n/)
})

test('reattaching with pty.connect gets the output from then on', async () => {
  const { handle } = await terminal({})
  await handle.disconnect()
  let seen = ''
  const again = await sbx.pty.connect(handle.pid, {
    onData: (data) => {
      seen += decoder.decode(data, { stream: true })
    },
  })
  await sbx.pty.sendInput(handle.pid, encoder.encode('echo "re""attached"; exit\n'))
  await again.wait()
  assert.match(seen, /reattached\r\n/)
})

test('kill ends the terminal and the programs in it', async () => {
  const { handle, screen } = await terminal({})
  await sbx.pty.sendInput(handle.pid, encoder.encode('sleep 600 & echo "bg $!"\n'))
  const background = await waitUntil(() => screen.text.match(/bg (\d+)/)?.[1])
  assert.ok(background, screen.text)
  assert.equal(await sbx.pty.kill(handle.pid), true)
  await assert.rejects(handle.wait(), (e) => {
    assert.ok(e instanceof CommandExitError, `${e}`)
    assert.equal(e.error, 'signal: killed')
    return true
  })
  assert.ok(await waitUntil(() => !processAlive(Number(background))), `sleep ${background} survived the kill`)
})

function processAlive(pid) {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}
