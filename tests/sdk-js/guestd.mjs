// The JS SDK tier's fixture: one freshly started guestd per test file, driven by the real E2B JS
// SDK (npm e2b, pinned in package.json) in debug mode.
//
// * `startGuestd()` starts `$GUESTD_BIN --listen 127.0.0.1:<port>` and waits for `GET /health`
//   → 204. Its `stop()` sends SIGTERM and fails the file if guestd does not exit 0 within the
//   grace, or if any process it started (seen in /proc before the stop) or any process carrying
//   the run's marker is still alive afterwards; those are then SIGKILLed so the machine stays clean.
// * `useFreshGuestd()` does both for a test file (`before`/`after` hooks), exporting `guestd` and
//   `sbx`.
// * `sandbox(guestd)` is `Sandbox.create({ sandboxUrl })` with `E2B_DEBUG=true` (set by
//   scripts/test-sdk-js.sh): in debug mode the SDK makes no API call and sends every envd request
//   to that URL.
// * `useTestUser()` creates a throw-away user with a supplementary group for a `describe`
//   (needs root: `needsRoot` skips it otherwise).

import assert from 'node:assert/strict'
import { execFileSync, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { closeSync, openSync, readFileSync, readdirSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before } from 'node:test'
import { setTimeout as sleep } from 'node:timers/promises'

import { Sandbox } from 'e2b'

/** Set in guestd's own environment; a child must never see it (children get an explicit env). */
export const LEAK_VAR = 'GUESTD_SDK_JS_AGENT_ONLY'

/** A string unique to this run: tests put it in command lines to find their processes. */
export const MARK = `guestd-js-${process.pid}-${randomBytes(4).toString('hex')}`

const STARTUP_MS = 20_000
const SHUTDOWN_GRACE_MS = 15_000

/** A port below the ephemeral range (32768–60999): polling it can never connect to itself. */
function pickPort() {
  return 20_000 + Math.floor(Math.random() * 12_000)
}

async function health(url) {
  try {
    const res = await fetch(`${url}/health`, { signal: AbortSignal.timeout(1000) })
    return res.status
  } catch {
    return undefined
  }
}

/** Every live process as `{ pid, ppid, cmdline }`, from /proc. */
export function processes() {
  const out = []
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue
    try {
      const stat = readFileSync(`/proc/${name}/stat`, 'utf8')
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
      if (fields[0] === 'Z') continue
      const cmdline = readFileSync(`/proc/${name}/cmdline`, 'utf8').replaceAll('\0', ' ').trim()
      out.push({ pid: Number(name), ppid: Number(fields[1]), cmdline })
    } catch {
      // gone while we looked
    }
  }
  return out
}

/** Live processes whose command line contains `needle`. */
export function marked(needle = MARK) {
  return processes().filter((p) => p.cmdline.includes(needle) && p.pid !== process.pid)
}

function descendants(pid) {
  const all = processes()
  const found = []
  let frontier = [pid]
  while (frontier.length > 0) {
    const children = all.filter((p) => frontier.includes(p.ppid))
    found.push(...children)
    frontier = children.map((p) => p.pid)
  }
  return found
}

/** Polls `check` every 20 ms until it returns a truthy value or `ms` pass; returns its last value. */
export async function waitUntil(check, ms = 5000) {
  const deadline = Date.now() + ms
  for (;;) {
    const value = await check()
    if (value || Date.now() > deadline) return value
    await sleep(20)
  }
}

export async function startGuestd() {
  const binary = process.env.GUESTD_BIN
  assert.ok(binary, 'GUESTD_BIN is not set: run this tier through scripts/test-sdk-js.sh')
  const logPath = join(process.env.GUESTD_TEST_LOG_DIR || tmpdir(), `guestd-js-${process.pid}.log`)
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = pickPort()
    const url = `http://127.0.0.1:${port}`
    const log = openSync(logPath, 'a')
    const child = spawn(binary, ['--listen', `127.0.0.1:${port}`], {
      stdio: ['ignore', log, log],
      env: { ...process.env, [LEAK_VAR]: 'leaked', RUST_LOG: process.env.RUST_LOG || 'info' },
    })
    closeSync(log)
    let exited = null
    child.on('exit', (code, signal) => {
      exited = { code, signal }
    })
    const deadline = Date.now() + STARTUP_MS
    while (exited === null && Date.now() < deadline) {
      if ((await health(url)) === 204) return guestdHandle(child, url, logPath, () => exited)
      await sleep(20)
    }
    child.kill('SIGKILL')
    const tail = readFileSync(logPath, 'utf8').split('\n').slice(-20).join('\n')
    // A port another program holds makes guestd exit at once: try another one.
    if (exited === null || !tail.includes('in use')) {
      assert.fail(`guestd did not answer /health with 204 on ${url} (exit: ${JSON.stringify(exited)}):\n${tail}`)
    }
  }
  assert.fail('no free port for guestd after 5 attempts')
}

function guestdHandle(child, url, logPath, exited) {
  return {
    url,
    pid: child.pid,
    logPath,
    async stop() {
      const started = descendants(child.pid)
      child.kill('SIGTERM')
      await waitUntil(() => exited() !== null, SHUTDOWN_GRACE_MS)
      const status = exited()
      const leftovers = [...started, ...marked()].filter((p) => isAlive(p.pid))
      for (const p of leftovers) killQuietly(p.pid)
      if (status === null) child.kill('SIGKILL')
      assert.deepEqual(status, { code: 0, signal: null }, `guestd did not exit 0 within ${SHUTDOWN_GRACE_MS} ms of SIGTERM (log: ${logPath})`)
      assert.deepEqual(leftovers.map((p) => p.cmdline), [], 'processes outlived guestd')
    },
  }
}

function isAlive(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    return stat.slice(stat.lastIndexOf(')') + 2)[0] !== 'Z'
  } catch {
    return false
  }
}

function killQuietly(pid) {
  try {
    process.kill(pid, 'SIGKILL')
  } catch {
    // already gone
  }
}

/** The guestd and sandbox of the file that called `useFreshGuestd` (live bindings: set by its hook). */
export let guestd
export let sbx

/** Starts a guestd and its `Sandbox` before this file's tests; stops and checks it after them. */
export function useFreshGuestd() {
  before(async () => {
    guestd = await startGuestd()
    sbx = await sandbox(guestd)
  })
  after(async () => {
    await guestd?.stop()
  })
}

export function sandbox(guestd) {
  assert.equal(process.env.E2B_DEBUG, 'true', 'E2B_DEBUG=true is not set: run this tier through scripts/test-sdk-js.sh')
  return Sandbox.create({ sandboxUrl: guestd.url })
}

/** `describe` options for tests that create a user: skipped, saying why, unless run as root. */
export const needsRoot = { skip: process.getuid() !== 0 && 'creating a user needs root' }

/** A throw-away user for the enclosing `describe`: created before its tests, removed after. */
export function useTestUser() {
  const user = {}
  before(() => {
    Object.assign(user, testUser())
  })
  after(() => user.remove?.())
  return user
}

/** Creates a user with a home and a supplementary group; `remove()` deletes both. */
function testUser() {
  const suffix = randomBytes(3).toString('hex')
  const name = `gjs${suffix}`
  const group = `gjsg${suffix}`
  execFileSync('groupadd', [group])
  execFileSync('useradd', ['--create-home', '--shell', '/bin/bash', '--groups', group, name])
  return {
    name,
    group,
    home: `/home/${name}`,
    remove() {
      execFileSync('userdel', ['--remove', name], { stdio: 'ignore' })
      execFileSync('groupdel', [group], { stdio: 'ignore' })
    },
  }
}
