// `sandbox.files` through the real E2B JS SDK against guestd. The JS SDK uploads differently
// from the Python one: several files go in one multipart body whose part names are full paths,
// a stream or `gzip: true` goes as application/octet-stream, and metadata as X-Metadata-* headers.

import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'

import { FileNotFoundError, FileType, FilesystemEventType, InvalidArgumentError, NotFoundError } from 'e2b'

import { needsRoot, sbx, useFreshGuestd, useTestUser, waitUntil } from './guestd.mjs'

useFreshGuestd()

let dir

before(() => {
  dir = mkdtempSync('/tmp/guestd-js-files-')
})

after(() => {
  rmSync(dir, { recursive: true, force: true })
})

const sha256 = (data) => createHash('sha256').update(data).digest('hex')

/** Every byte value, twice, then some random bytes: survives no text decoding by accident. */
const binary = Buffer.concat([Buffer.from(Array.from({ length: 512 }, (_, i) => i % 256)), randomBytes(4096)])

describe('write and read', () => {
  test('text round-trips, and the answer describes the written file', async () => {
    const path = join(dir, 'hello.txt')
    const info = await sbx.files.write(path, 'héllo\nwörld\n')
    assert.deepEqual({ name: info.name, type: info.type, path: info.path }, { name: 'hello.txt', type: FileType.FILE, path })
    assert.equal(readFileSync(path, 'utf8'), 'héllo\nwörld\n')
    assert.equal(await sbx.files.read(path), 'héllo\nwörld\n')
  })

  test('bytes round-trip in every read format', async () => {
    const path = join(dir, 'binary.bin')
    await sbx.files.write(path, binary.buffer.slice(binary.byteOffset, binary.byteOffset + binary.length))
    assert.deepEqual(readFileSync(path), binary)
    assert.deepEqual(Buffer.from(await sbx.files.read(path, { format: 'bytes' })), binary)
    const blob = await sbx.files.read(path, { format: 'blob' })
    assert.deepEqual(Buffer.from(await blob.arrayBuffer()), binary)
    const chunks = []
    for await (const chunk of await sbx.files.read(path, { format: 'stream' })) chunks.push(Buffer.from(chunk))
    assert.deepEqual(Buffer.concat(chunks), binary)
  })

  test('several files in one multipart upload land at their full paths, parents created', async () => {
    const files = [
      { path: join(dir, 'multi', 'a.txt'), data: 'first' },
      { path: join(dir, 'multi', 'deep', 'er', 'b.bin'), data: new Blob([binary]) },
      { path: join(dir, 'multi', 'c.txt'), data: '' },
    ]
    const infos = await sbx.files.write(files)
    assert.deepEqual(
      infos.map((i) => i.path),
      files.map((f) => f.path),
    )
    assert.equal(readFileSync(files[0].path, 'utf8'), 'first')
    assert.deepEqual(readFileSync(files[1].path), binary)
    assert.equal(statSync(files[2].path).size, 0)
  })

  test('a stream uploads as octet-stream; gzip both ways', async () => {
    const path = join(dir, 'streamed.bin')
    const stream = new ReadableStream({
      start(controller) {
        for (let i = 0; i < 8; i++) controller.enqueue(new Uint8Array(binary))
        controller.close()
      },
    })
    await sbx.files.write(path, stream)
    const expected = Buffer.concat(Array(8).fill(binary))
    assert.deepEqual(readFileSync(path), expected)

    const zipped = join(dir, 'zipped.txt')
    const text = 'compressible '.repeat(10_000)
    await sbx.files.write(zipped, text, { gzip: true })
    assert.equal(readFileSync(zipped, 'utf8'), text)
    assert.equal(await sbx.files.read(zipped, { gzip: true }), text)
  })

  test('20 MB up and down intact', async () => {
    const path = join(dir, 'big.bin')
    const big = randomBytes(20 * 1024 * 1024)
    await sbx.files.write(path, new Blob([big]))
    assert.equal(sha256(readFileSync(path)), sha256(big))
    const back = Buffer.from(await sbx.files.read(path, { format: 'bytes' }))
    assert.equal(back.length, big.length)
    assert.equal(sha256(back), sha256(big))
  })

  test('metadata written with a file comes back from getInfo and list', async () => {
    const path = join(dir, 'tagged.txt')
    const written = await sbx.files.write(path, 'x', { metadata: { owner: 'team-a', Build: '42' } })
    const expected = { owner: 'team-a', build: '42' }
    assert.deepEqual(written.metadata, expected)
    assert.deepEqual((await sbx.files.getInfo(path)).metadata, expected)
    const listed = (await sbx.files.list(dir)).find((e) => e.path === path)
    assert.deepEqual(listed.metadata, expected)
  })

  test('reading what is not there is FileNotFoundError naming the path', async () => {
    const path = join(dir, 'missing.txt')
    await assert.rejects(sbx.files.read(path), (e) => {
      assert.ok(e instanceof FileNotFoundError || e instanceof NotFoundError, `${e?.constructor?.name}: ${e}`)
      assert.match(e.message, /missing\.txt/)
      return true
    })
  })

  test('reading a directory is InvalidArgumentError', async () => {
    await assert.rejects(sbx.files.read(dir), InvalidArgumentError)
  })
})

describe('directories and entries', () => {
  test('makeDir, exists, getInfo, list with depth, rename, remove', async () => {
    const base = join(dir, 'tree')
    assert.equal(await sbx.files.makeDir(join(base, 'sub', 'leaf')), true)
    assert.equal(await sbx.files.makeDir(join(base, 'sub')), false, 'an existing directory is not made again')
    writeFileSync(join(base, 'sub', 'file.txt'), '12345')
    assert.equal(await sbx.files.exists(join(base, 'sub', 'file.txt')), true)
    assert.equal(await sbx.files.exists(join(base, 'nope')), false)

    const info = await sbx.files.getInfo(join(base, 'sub', 'file.txt'))
    assert.equal(info.type, FileType.FILE)
    assert.equal(info.size, 5)
    assert.equal(info.permissions, '-rw-r--r--')
    assert.equal(info.owner, 'root')
    assert.ok(info.modifiedTime instanceof Date && Math.abs(info.modifiedTime - Date.now()) < 60_000)

    const shallow = (await sbx.files.list(base)).map((e) => e.path)
    assert.deepEqual(shallow, [join(base, 'sub')])
    const deep = (await sbx.files.list(base, { depth: 3 })).map((e) => e.path).sort()
    assert.deepEqual(deep, [join(base, 'sub'), join(base, 'sub', 'file.txt'), join(base, 'sub', 'leaf')])

    const moved = await sbx.files.rename(join(base, 'sub'), join(base, 'moved'))
    assert.equal(moved.path, join(base, 'moved'))
    assert.equal(moved.type, FileType.DIR)
    assert.equal(readFileSync(join(base, 'moved', 'file.txt'), 'utf8'), '12345')

    await sbx.files.remove(join(base, 'moved'))
    assert.equal(await sbx.files.exists(join(base, 'moved')), false)
  })

  test('a symlink is listed with its target', async () => {
    const link = join(dir, 'link')
    await sbx.commands.run(`ln -s /etc/hostname ${link}`)
    const info = await sbx.files.getInfo(link)
    assert.equal(info.symlinkTarget, '/etc/hostname')
  })

  describe('as a non-root user', needsRoot, () => {
    const user = useTestUser()

    test('relative paths are in its home, and what it writes is its own', async () => {
      await sbx.files.write('notes/today.txt', 'mine', { user: user.name })
      const info = await sbx.files.getInfo(`${user.home}/notes/today.txt`)
      assert.equal(info.owner, user.name)
      assert.equal(await sbx.files.read('notes/today.txt', { user: user.name }), 'mine')
    })

    test('the user is not an access check: as envd, file operations act with guestd’s privileges', async () => {
      // envd does every /files and filesystem operation as root; the user picks the home and the
      // owner only (http.md §3). Templates rely on it, e.g. writing under /etc as `user`.
      const secret = join(dir, 'secret.txt')
      writeFileSync(secret, 'root only', { mode: 0o600 })
      assert.equal(await sbx.files.read(secret, { user: user.name }), 'root only')
    })
  })
})

describe('watchDir', () => {
  test('create, write, rename and remove arrive as events, recursively', async () => {
    const watched = join(dir, 'watched')
    await sbx.files.makeDir(join(watched, 'inner'))
    const events = []
    const handle = await sbx.files.watchDir(watched, (e) => events.push(e), { recursive: true })
    try {
      await sbx.files.write(join(watched, 'top.txt'), 'one')
      await sbx.files.write(join(watched, 'inner', 'deep.txt'), 'two')
      await sbx.files.rename(join(watched, 'top.txt'), join(watched, 'renamed.txt'))
      await sbx.files.remove(join(watched, 'renamed.txt'))
      const has = (type, name) => events.some((e) => e.type === type && e.name === name)
      const all = await waitUntil(
        () =>
          has(FilesystemEventType.CREATE, 'top.txt') &&
          has(FilesystemEventType.WRITE, 'top.txt') &&
          has(FilesystemEventType.CREATE, 'inner/deep.txt') &&
          has(FilesystemEventType.RENAME, 'top.txt') &&
          has(FilesystemEventType.CREATE, 'renamed.txt') &&
          has(FilesystemEventType.REMOVE, 'renamed.txt'),
        5000,
      )
      assert.ok(all, JSON.stringify(events))
    } finally {
      await handle.stop()
    }
  })

  test('watching what does not exist fails at once', async () => {
    await assert.rejects(sbx.files.watchDir(join(dir, 'absent'), () => {}), (e) => {
      assert.match(e.message, /absent/)
      return true
    })
  })
})
