// `sandbox.commands` through the real E2B JS SDK (npm e2b, debug mode) against guestd: the bytes
// of stdout/stderr, exit codes, the error classes the SDK throws, and that processes really start,
// stop and disappear.

import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { after, before, describe, test } from 'node:test'

import { CommandExitError, TimeoutError } from 'e2b'

import { LEAK_VAR, MARK, marked, needsRoot, sbx, useFreshGuestd, useTestUser, waitUntil } from './guestd.mjs'

useFreshGuestd()

/** A `sleep` whose command line carries `label` and the run's marker, to find it in /proc. */
function sleeper(label, seconds = 600) {
  return `exec -a "${label}-${MARK}" sleep ${seconds}`
}

describe('foreground', () => {
  test('run returns stdout, stderr and the exit code', async () => {
    const r = await sbx.commands.run("echo out-1; echo err-1 >&2; printf 'no newline'")
    assert.equal(r.exitCode, 0)
    assert.equal(r.stdout, 'out-1\nno newline')
    assert.equal(r.stderr, 'err-1\n')
    assert.equal(r.error, undefined)
  })

  test('a non-zero exit throws CommandExitError carrying the output', async () => {
    await assert.rejects(sbx.commands.run('echo partial; echo boom >&2; exit 3'), (e) => {
      assert.ok(e instanceof CommandExitError, `${e}`)
      assert.equal(e.exitCode, 3)
      assert.equal(e.stdout, 'partial\n')
      assert.equal(e.stderr, 'boom\n')
      return true
    })
  })

  test('onStdout and onStderr see every chunk, in order', async () => {
    const out = []
    const err = []
    const r = await sbx.commands.run('for i in $(seq 1 200); do echo "o$i"; echo "e$i" >&2; done', {
      onStdout: (d) => out.push(d),
      onStderr: (d) => err.push(d),
    })
    const expected = (p) => Array.from({ length: 200 }, (_, i) => `${p}${i + 1}\n`).join('')
    assert.equal(out.join(''), expected('o'))
    assert.equal(err.join(''), expected('e'))
    assert.equal(r.stdout, expected('o'))
  })

  test('envs and cwd reach the command; guestd’s own environment does not', async () => {
    const r = await sbx.commands.run(`echo "$FOO|$EMPTY|\${${LEAK_VAR}-unset}"; pwd`, {
      envs: { FOO: 'bar baz', EMPTY: '' },
      cwd: '/usr/share',
    })
    assert.equal(r.stdout, 'bar baz||unset\n/usr/share\n')
  })

  test('a missing cwd is an error naming it', async () => {
    await assert.rejects(sbx.commands.run('true', { cwd: `/nonexistent-${MARK}` }), (e) => {
      assert.match(e.message, new RegExp(`/nonexistent-${MARK}`))
      return true
    })
  })

  test('20 MB of output arrives intact', async () => {
    const file = `/tmp/out-${MARK}`
    const made = await sbx.commands.run(`head -c 15000000 /dev/urandom | base64 > ${file}; sha256sum < ${file}`)
    const r = await sbx.commands.run(`cat ${file}; rm ${file}`)
    assert.ok(r.stdout.length > 20_000_000, `${r.stdout.length} bytes`)
    const digest = createHash('sha256').update(r.stdout).digest('hex')
    assert.equal(digest, made.stdout.split(' ')[0])
  })
})

describe('timeouts and signals', () => {
  test('timeoutMs ends the command with TimeoutError and kills its whole tree', async () => {
    const started = Date.now()
    await assert.rejects(sbx.commands.run(`(${sleeper('timeout')}) & ${sleeper('timeout')}`, { timeoutMs: 700 }), TimeoutError)
    assert.ok(Date.now() - started < 10_000)
    const gone = await waitUntil(() => marked(`timeout-${MARK}`).length === 0, 5000)
    assert.ok(gone, `still running: ${JSON.stringify(marked(`timeout-${MARK}`))}`)
  })

  test('timeoutMs: 0 means no time limit (the SDK then sends no Connect-Timeout-Ms)', async () => {
    const r = await sbx.commands.run('sleep 0.5; echo finished', { timeoutMs: 0 })
    assert.equal(r.stdout, 'finished\n')
  })

  test('kill ends a background command and every process it started', async () => {
    const tree = `(${sleeper('kill')}) & (setsid bash -c '${sleeper('kill')}') & ${sleeper('kill')}`
    const h = await sbx.commands.run(tree, { background: true })
    await waitUntil(() => marked(`kill-${MARK}`).length === 3)
    assert.equal(marked(`kill-${MARK}`).length, 3)
    assert.equal(await sbx.commands.kill(h.pid), true)
    await assert.rejects(h.wait(), (e) => {
      assert.ok(e instanceof CommandExitError, `${e}`)
      assert.equal(e.error, 'signal: killed')
      return true
    })
    assert.ok(await waitUntil(() => marked(`kill-${MARK}`).length === 0, 5000))
    assert.equal(await sbx.commands.kill(h.pid), false, 'a second kill finds nothing to kill')
  })
})

describe('background, list, stdin, connect', () => {
  test('a background command is listed with its command line and waits for its exit', async () => {
    const h = await sbx.commands.run(`sleep 0.5; echo done-${MARK}`, { background: true, envs: { K: 'v' }, cwd: '/tmp' })
    const listed = (await sbx.commands.list()).find((p) => p.pid === h.pid)
    assert.ok(listed, 'the command is in the list')
    assert.equal(listed.cmd, '/bin/bash')
    assert.deepEqual(listed.args, ['-l', '-c', `sleep 0.5; echo done-${MARK}`])
    assert.equal(listed.cwd, '/tmp')
    assert.equal(listed.envs.K, 'v')
    const r = await h.wait()
    assert.equal(r.stdout, `done-${MARK}\n`)
    assert.equal((await sbx.commands.list()).find((p) => p.pid === h.pid), undefined)
  })

  test('sendStdin then closeStdin: cat echoes the bytes and ends', async () => {
    assert.equal(sbx.commands.supportsStdinClose, true)
    const h = await sbx.commands.run('cat; echo "[eof]"', { background: true, stdin: true })
    await sbx.commands.sendStdin(h.pid, 'hello ')
    await h.sendStdin(new TextEncoder().encode('wörld\n'))
    await sbx.commands.closeStdin(h.pid)
    const r = await h.wait()
    assert.equal(r.stdout, 'hello wörld\n[eof]\n')
  })

  test('without stdin the command reads end of file at once', async () => {
    const r = await sbx.commands.run('cat; echo after-cat', { timeoutMs: 10_000 })
    assert.equal(r.stdout, 'after-cat\n')
  })

  test('connect reattaches to a running command and gets the rest of its output', async () => {
    const h = await sbx.commands.run('read line; echo "got $line"; sleep 0.3; echo last', { background: true, stdin: true })
    await h.disconnect()
    const seen = []
    const again = await sbx.commands.connect(h.pid, { onStdout: (d) => seen.push(d) })
    await sbx.commands.sendStdin(h.pid, 'ping\n')
    const r = await again.wait()
    assert.equal(r.exitCode, 0)
    assert.equal(seen.join(''), 'got ping\nlast\n')
  })

  test('a disconnect leaves the command running', async () => {
    const h = await sbx.commands.run(`sleep 1; echo survived`, { background: true })
    await h.disconnect()
    await new Promise((resolve) => setTimeout(resolve, 300))
    const again = await sbx.commands.connect(h.pid)
    const r = await again.wait()
    assert.equal(r.exitCode, 0)
    assert.equal(r.stdout, 'survived\n')
  })

  test('32 concurrent commands each get their own output', async () => {
    const results = await Promise.all(
      Array.from({ length: 32 }, (_, i) => sbx.commands.run(`sleep 0.$((RANDOM % 5)); echo ${i}; echo e${i} >&2`)),
    )
    results.forEach((r, i) => {
      assert.equal(r.stdout, `${i}\n`)
      // Only the end: 32 login shells at once may have the machine's profile complain first
      // (this host's pyenv init races on its shims lock).
      assert.ok(r.stderr.endsWith(`e${i}\n`), r.stderr)
    })
  })
})

describe('users', needsRoot, () => {
  const user = useTestUser()

  test('root by default', async () => {
    const r = await sbx.commands.run('id -u; echo $HOME')
    assert.equal(r.stdout, '0\n/root\n')
  })

  test('a non-root user runs with its uid, groups, home and environment', async () => {
    const r = await sbx.commands.run('id -un; id -Gn; echo "$HOME $USER $LOGNAME"; pwd', { user: user.name })
    assert.equal(r.stdout, `${user.name}\n${user.name} ${user.group}\n${user.home} ${user.name} ${user.name}\n${user.home}\n`)
  })

  test('an unknown user is refused', async () => {
    await assert.rejects(sbx.commands.run('true', { user: `nobody-${MARK}` }), (e) => {
      assert.match(e.message, new RegExp(`nobody-${MARK}`))
      return true
    })
  })
})
