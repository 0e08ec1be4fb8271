/* xmrig-lite: a tiny CPU miner in the style of XMRig and cpuminer, written for corral's scenarios.
 *
 * It really mines: double SHA-256 over an 80-byte block header, counting hashes and checking each against
 * the target. It first tries its pool (stratum+tcp, mining.subscribe); when the pool is unreachable it
 * falls back to the built-in benchmark job, as real miners do. The usage text and pool strings are the
 * ones real miners carry, so a scan of the binary can recognise what it is even under an innocent name.
 */
#include <netdb.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define APP_NAME "xmrig-lite"
#define APP_VERSION "6.21.0-lite"

static const char *USAGE =
    "Usage: " APP_NAME " [OPTIONS]\n"
    "\n"
    "Network:\n"
    "  -o, --url=URL                 URL of mining server, e.g. stratum+tcp://pool.example.internal:3333\n"
    "  -a, --algo=ALGO               mining algorithm: rx/0 (RandomX), cn/r (cryptonight), sha256d\n"
    "  -u, --user=USERNAME           username (wallet address) for mining server\n"
    "  -p, --pass=PASSWORD           password for mining server\n"
    "      --donate-level=N          donate level, default 1% (1 minute in 100 minutes)\n"
    "      --nicehash                enable nicehash.com support\n"
    "      --tls                     enable SSL/TLS support (needs pool support)\n"
    "\n"
    "CPU backend:\n"
    "  -t, --threads=N               number of CPU threads, proper value is detected automatically\n"
    "      --cpu-priority=N          set process priority (0 idle, 2 normal to 5 highest)\n"
    "      --randomx-mode=MODE       RandomX mode: auto, fast, light\n"
    "      --randomx-1gb-pages       use 1GB hugepages for RandomX dataset (Linux only)\n"
    "\n"
    "Miscellaneous:\n"
    "  -B, --background              run the miner in the background\n"
    "      --duration=N              stop after N seconds (benchmark)\n"
    "  -h, --help                    display this help and exit\n";

static const char *DEFAULT_POOL = "stratum+tcp://pool.example.internal:3333";
static const char *DEFAULT_WALLET =
    "48edfHu7V9Z84YzzMa6fUueoELZ9ZRXq9VetWzYGzKt52XU5xvqgzYnDK9URnRoJMk1j8nLwEVsaSWJ4fhdUyZijBGUicoD";
static const char *SUBSCRIBE = "{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[\"" APP_NAME "/" APP_VERSION "\"]}\n";

/* ---- SHA-256 (FIPS 180-4) ---------------------------------------------------------------------------- */

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(uint32_t h[8], const uint8_t block[64]) {
    uint32_t w[64], a, b, c, d, e, f, g, k, t1, t2;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)block[4 * i] << 24 | (uint32_t)block[4 * i + 1] << 16 |
               (uint32_t)block[4 * i + 2] << 8 | block[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
        t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += k;
}

static void sha256(const uint8_t *data, size_t len, uint8_t out[32]) {
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    uint8_t block[64];
    size_t done = 0;
    for (; len - done >= 64; done += 64) sha256_block(h, data + done);
    size_t rest = len - done;
    memset(block, 0, 64);
    memcpy(block, data + done, rest);
    block[rest] = 0x80;
    if (rest >= 56) {
        sha256_block(h, block);
        memset(block, 0, 64);
    }
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) block[63 - i] = (uint8_t)(bits >> (8 * i));
    sha256_block(h, block);
    for (int i = 0; i < 8; i++)
        out[4 * i] = h[i] >> 24, out[4 * i + 1] = h[i] >> 16, out[4 * i + 2] = h[i] >> 8, out[4 * i + 3] = h[i];
}

/* ---- pool ------------------------------------------------------------------------------------------ */

/* Try the pool once: resolve, connect, mining.subscribe. Returns the socket, or -1 (then: benchmark). */
static int pool_connect(const char *url) {
    char host[256];
    const char *port = "3333";
    const char *start = strstr(url, "://");
    start = start ? start + 3 : url;
    snprintf(host, sizeof host, "%s", start);
    char *colon = strrchr(host, ':');
    if (colon) {
        *colon = '\0';
        port = start + (colon - host) + 1;
    }
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "[net] %s: %s\n", host, gai_strerror(rc));
        return -1;
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, res->ai_addr, res->ai_addrlen) != 0 ||
        write(fd, SUBSCRIBE, strlen(SUBSCRIBE)) < 0) {
        perror("[net] connect");
        if (fd >= 0) close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

/* ---- main ------------------------------------------------------------------------------------------ */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    const char *url = DEFAULT_POOL;
    double duration = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            fputs(USAGE, stdout);
            return 0;
        } else if (!strcmp(argv[i], "-o") && i + 1 < argc) {
            url = argv[++i];
        } else if (!strncmp(argv[i], "--duration=", 11)) {
            duration = atof(argv[i] + 11);
        }
    }
    signal(SIGPIPE, SIG_IGN);
    printf(" * ABOUT        %s/%s gcc\n * POOL #1      %s algo sha256d\n * DONATE       1%%\n", APP_NAME,
           APP_VERSION, url);
    fflush(stdout);
    int pool = pool_connect(url);
    if (pool < 0) printf("[net] pool unreachable; benchmark mode (wallet %.8s...)\n", DEFAULT_WALLET);
    fflush(stdout);

    /* A fixed benchmark header; the nonce is its last four bytes. */
    uint8_t header[80], first[32], second[32];
    for (int i = 0; i < 80; i++) header[i] = (uint8_t)(i * 37 + 11);
    double started = now(), last = started;
    uint64_t hashes = 0, best = UINT64_MAX;
    for (uint32_t nonce = 0;; nonce++) {
        memcpy(header + 76, &nonce, 4);
        sha256(header, 80, first);
        sha256(first, 32, second);
        uint64_t top = (uint64_t)second[31] << 24 | second[30] << 16 | second[29] << 8 | second[28];
        if (top < best) best = top;
        if (++hashes % 65536 == 0) {
            double t = now();
            if (t - last >= 1.0) {
                printf("[cpu] speed %.1f kH/s, best share %08llx\n", hashes / (t - started) / 1000,
                       (unsigned long long)best);
                fflush(stdout);
                last = t;
            }
            if (duration > 0 && t - started >= duration) break;
        }
    }
    printf("[cpu] done: %llu hashes\n", (unsigned long long)hashes);
    if (pool >= 0) close(pool);
    return 0;
}
