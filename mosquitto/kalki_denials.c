/* A Mosquitto 2 plugin that refuses what the broker's own files cannot, and tells the supervisor,
 * which cannot see these refusals otherwise (Mosquitto logs a denied PUBLISH only at debug
 * level, with every other message).
 *
 * Publishes. The broker's ACL file (appliance/system/broker.py) still decides. This plugin is
 * asked first, for every write, and knows the one rule it counts: a device user may publish to
 * <base>/<user> and <base>/<user>/availability only. Any other write by a device is refused here
 * and counted; everything else is deferred to the ACL file, and so is every write of the
 * supervisor and of Home Assistant's user (its posture commands and birth message: the ACL file
 * says where it may write).
 *
 * Client ids. MQTT lets a new connection with the client id of one already connected kick the
 * old one off: a device, or whoever holds one device's password, connecting as another device's
 * client id or as the supervisor's would disconnect it. So a user may connect only with a client
 * id that is its user name or starts with its user name and "-" ("plug1", "plug1-2"), unless a
 * longer user name owns it the same way ("plug1-2-x" is user "plug1-2"'s, if there is one), or
 * with none at all: the broker then makes one, "auto-" and a random UUID, nobody else's to
 * choose. Any other is refused at authentication, before the broker looks for the session it
 * would replace; the password file still decides everything else. A refusal is counted only
 * when the password was right, so that nobody without a device's password can make it look as
 * if that device tried.
 *
 * Reports go to <base>/bridge/denied, at most one a second, as
 *   {"denied": [{"user": "plug1", "count": 3, "topic": "kalki/camera1"}, ...],
 *    "connects": [{"user": "light1", "count": 1, "client_id": "plug1"}, ...], "untracked": 0}
 * with the counts since the previous report and the last topic or client id each user tried.
 * A flood of forged publishes or connections costs the supervisor one message a second.
 *
 * Options: plugin_opt_base (the topic base), plugin_opt_supervisor and plugin_opt_home_assistant
 * (the users the publish rule does not apply to; the second optional), plugin_opt_passwords (the password file: the user names that own client
 * ids, and the passwords a refusal is checked against; without it, a user name owns every id it
 * begins with and every refusal is counted).
 */
#define _GNU_SOURCE             /* RTLD_DEFAULT */
#include <dlfcn.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define MAX_USERS 64        /* users tracked between two reports, of each kind; the rest are "untracked" */
#define NAME_LEN 64
#define WHAT_LEN 128        /* the topic or client id kept for a report */
#define PATH_LEN 4096
#define HASH_LEN 512        /* a password file's hash: "$7$101$<16 base64>$<88 base64>" */
/* Both lists, everything escaped (6 bytes a byte at worst), and the keys around them. */
#define REPORT_LEN (2 * MAX_USERS * (6 * NAME_LEN + 6 * WHAT_LEN + 64) + 256)
#define AUTO_ID_PREFIX "auto-"   /* Mosquitto's auto_id_prefix, which broker.py leaves alone */

struct tally {
	char user[NAME_LEN];
	char what[WHAT_LEN];
	unsigned long count;
};

struct tallies {
	const char *key;        /* in the report */
	const char *what_key;
	struct tally t[MAX_USERS];
	int n;
};

static mosquitto_plugin_id_t *plugin_id;
static char base[NAME_LEN] = "kalki";
static char supervisor[NAME_LEN] = "kalki";
static char home_assistant[NAME_LEN];   /* empty: none */
static char passwords[PATH_LEN];
static char report_topic[NAME_LEN + 16];
static struct tallies publishes = {.key = "denied", .what_key = "topic"};
static struct tallies connects = {.key = "connects", .what_key = "client_id"};
static unsigned long untracked;
static time_t last_report;
static char report[REPORT_LEN];
static char *password_text;     /* the password file as last read, and which file that was */
static struct stat password_stat;

/* Copies at most size - 1 bytes, never cutting a UTF-8 character in two. */
static void copy_utf8(char *dst, const char *src, size_t size)
{
	size_t n = strlen(src);

	if (n >= size) {
		n = size - 1;
		while (n > 0 && ((unsigned char)src[n] & 0xC0) == 0x80)
			n--;
	}
	memcpy(dst, src, n);
	dst[n] = '\0';
}

/* Appends s as a JSON string; a topic or client id may hold quotes, backslashes and control
 * characters. */
static size_t put_json_string(char *out, size_t at, const char *s)
{
	out[at++] = '"';
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == '"' || c == '\\') {
			out[at++] = '\\';
			out[at++] = (char)c;
		} else if (c < 0x20) {
			at += (size_t)sprintf(out + at, "\\u%04x", c);
		} else {
			out[at++] = (char)c;
		}
	}
	out[at++] = '"';
	return at;
}

static size_t put_tallies(char *out, size_t at, struct tallies *list)
{
	at += (size_t)sprintf(out + at, "\"%s\": [", list->key);
	for (int i = 0; i < list->n; i++) {
		at += (size_t)sprintf(out + at, "%s{\"user\": ", i ? ", " : "");
		at = put_json_string(out, at, list->t[i].user);
		at += (size_t)sprintf(out + at, ", \"count\": %lu, \"%s\": ", list->t[i].count,
				      list->what_key);
		at = put_json_string(out, at, list->t[i].what);
		out[at++] = '}';
	}
	out[at++] = ']';
	list->n = 0;
	return at;
}

static void send_report(time_t now)
{
	size_t at = 0;

	if (publishes.n == 0 && connects.n == 0 && untracked == 0)
		return;
	report[at++] = '{';
	at = put_tallies(report, at, &publishes);
	at += (size_t)sprintf(report + at, ", ");
	at = put_tallies(report, at, &connects);
	at += (size_t)sprintf(report + at, ", \"untracked\": %lu}", untracked);
	mosquitto_broker_publish_copy(NULL, report_topic, (int)at, report, 1, false, NULL);
	untracked = 0;
	last_report = now;
}

static void report_if_due(void)
{
	time_t now = time(NULL);

	if (now > last_report)
		send_report(now);
}

static void count(struct tallies *list, const char *user, const char *what)
{
	int i;

	for (i = 0; i < list->n && strcmp(list->t[i].user, user) != 0; i++)
		;
	if (i == list->n) {
		if (list->n == MAX_USERS || strlen(user) >= NAME_LEN) {
			untracked++;
			return;
		}
		copy_utf8(list->t[i].user, user, NAME_LEN);
		list->t[i].count = 0;
		list->n++;
	}
	list->t[i].count++;
	copy_utf8(list->t[i].what, what, WHAT_LEN);
}

/* ------------------------------------------------------------------ publishes */

/* <base>/<user> or <base>/<user>/availability */
static bool own_topic(const char *user, const char *topic)
{
	size_t b = strlen(base), u = strlen(user);

	if (strncmp(topic, base, b) != 0 || topic[b] != '/' || strncmp(topic + b + 1, user, u) != 0)
		return false;
	topic += b + 1 + u;
	return *topic == '\0' || strcmp(topic, "/availability") == 0;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *check = event_data;
	const char *user = mosquitto_client_username(check->client);

	(void)event;
	(void)userdata;
	if (check->access != MOSQ_ACL_WRITE || user == NULL || strcmp(user, supervisor) == 0
	    || (home_assistant[0] != '\0' && strcmp(user, home_assistant) == 0)
	    || own_topic(user, check->topic))
		return MOSQ_ERR_PLUGIN_DEFER;
	count(&publishes, user, check->topic);
	report_if_due();
	return MOSQ_ERR_ACL_DENIED;
}

/* ------------------------------------------------------------------ client ids */

/* The password file's text, read again whenever it has been replaced (broker.py replaces it
 * whole); NULL when there is none to read. */
static const char *password_file(void)
{
	struct stat st;
	FILE *f;
	char *text;
	size_t n;

	if (passwords[0] == '\0' || stat(passwords, &st) != 0)
		return NULL;
	if (password_text != NULL && st.st_dev == password_stat.st_dev
	    && st.st_ino == password_stat.st_ino && st.st_size == password_stat.st_size
	    && st.st_mtim.tv_sec == password_stat.st_mtim.tv_sec
	    && st.st_mtim.tv_nsec == password_stat.st_mtim.tv_nsec)
		return password_text;
	f = fopen(passwords, "r");
	if (f == NULL)
		return NULL;
	if (fstat(fileno(f), &st) != 0 || (text = malloc((size_t)st.st_size + 1)) == NULL) {
		fclose(f);
		return NULL;
	}
	n = fread(text, 1, (size_t)st.st_size, f);
	fclose(f);
	text[n] = '\0';
	free(password_text);
	password_text = text;
	password_stat = st;
	return password_text;
}

/* Calls found(name, length, rest of the line, its length, arg) for each "name:hash" line. */
static void each_user(const char *text, void (*found)(const char *, size_t, const char *, size_t, void *),
		      void *arg)
{
	while (*text) {
		const char *end = strchr(text, '\n');
		size_t len = end ? (size_t)(end - text) : strlen(text);
		const char *colon = memchr(text, ':', len);

		if (colon != NULL && text[0] != '#')
			found(text, (size_t)(colon - text), colon + 1, len - (size_t)(colon - text) - 1, arg);
		text += len + (end != NULL);
	}
}

struct owner {
	const char *id;
	size_t length;          /* of the longest user name owning id, 0 if none */
};

static void longer_owner(const char *name, size_t n, const char *rest, size_t r, void *arg)
{
	struct owner *owner = arg;

	(void)rest;
	(void)r;
	if (n > owner->length && strncmp(owner->id, name, n) == 0
	    && (owner->id[n] == '\0' || owner->id[n] == '-'))
		owner->length = n;
}

struct lookup {
	const char *user;
	char *hash;             /* NUL-terminated; empty if the user is not in the file */
};

static void user_hash(const char *name, size_t n, const char *rest, size_t r, void *arg)
{
	struct lookup *lookup = arg;

	if (n != strlen(lookup->user) || strncmp(name, lookup->user, n) != 0)
		return;
	while (r > 0 && (rest[r - 1] == '\r' || rest[r - 1] == ' ' || rest[r - 1] == '\t'))
		r--;
	if (r >= HASH_LEN)
		r = 0;
	memcpy(lookup->hash, rest, r);
	lookup->hash[r] = '\0';
}

/* "auto-" and a UUID in capitals: what Mosquitto 2.0 assigns a client that sent no id. */
static bool assigned_id(const char *id)
{
	size_t p = strlen(AUTO_ID_PREFIX);

	if (strncmp(id, AUTO_ID_PREFIX, p) != 0 || strlen(id) != p + 36)
		return false;
	for (int i = 0; i < 36; i++) {
		char c = id[p + (size_t)i];

		if (i == 8 || i == 13 || i == 18 || i == 23) {
			if (c != '-')
				return false;
		} else if (!((c >= '0' && c <= '9') || (c >= 'A' && c <= 'F'))) {
			return false;
		}
	}
	return true;
}

/* text: the password file, or NULL */
static bool id_allowed(const char *user, const char *id, const char *text)
{
	size_t u = strlen(user);
	struct owner owner = {id, 0};

	if (strcmp(id, user) == 0)
		return true;    /* nobody's name is longer and the same */
	if (strncmp(id, user, u) == 0 && id[u] == '-') {
		if (text == NULL)
			return true;
		each_user(text, longer_owner, &owner);
		return owner.length == u;
	}
	return assigned_id(id);
}

static int base64_decode(const char *in, unsigned char *out, size_t size)
{
	static const char digits[] =
		"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	unsigned int bits = 0, held = 0;
	size_t n = 0;

	for (; *in && *in != '='; in++) {
		const char *d = strchr(digits, *in);

		if (d == NULL)
			return -1;
		bits = (bits << 6) | (unsigned int)(d - digits);
		held += 6;
		if (held >= 8) {
			held -= 8;
			if (n == size)
				return -1;
			out[n++] = (unsigned char)(bits >> held);
		}
	}
	return (int)n;
}

typedef const void *(*digest_fn)(void);
typedef int (*pbkdf2_fn)(const char *, int, const unsigned char *, int, int, const void *, int,
			 unsigned char *);

/* 1 if password is the one hash was made from, 0 if not, -1 if that cannot be told here. Mosquitto
 * 2.0's own way ($7$: PBKDF2-SHA512, what broker.py writes), with the broker's own libcrypto:
 * the plugin links nothing itself. */
static int password_matches(const char *hash, const char *password)
{
	pbkdf2_fn pbkdf2 = (pbkdf2_fn)dlsym(RTLD_DEFAULT, "PKCS5_PBKDF2_HMAC");
	digest_fn sha512 = (digest_fn)dlsym(RTLD_DEFAULT, "EVP_sha512");
	char salt64[HASH_LEN];
	unsigned char salt[HASH_LEN], want[HASH_LEN], got[64];
	const char *hash64;
	char *end;
	long iterations;
	int salt_len, want_len;
	unsigned char differ = 0;

	if (strncmp(hash, "$7$", 3) != 0 || pbkdf2 == NULL || sha512 == NULL)
		return -1;
	iterations = strtol(hash + 3, &end, 10);
	if (*end != '$' || iterations < 1 || iterations > 1000000)
		return -1;
	hash64 = strchr(end + 1, '$');
	if (hash64 == NULL)
		return -1;
	memcpy(salt64, end + 1, (size_t)(hash64 - end - 1));
	salt64[hash64 - end - 1] = '\0';
	salt_len = base64_decode(salt64, salt, sizeof(salt));
	want_len = base64_decode(hash64 + 1, want, sizeof(want));
	if (salt_len <= 0 || want_len != (int)sizeof(got))
		return -1;
	if (password == NULL)
		return 0;
	if (!pbkdf2(password, (int)strlen(password), salt, salt_len, (int)iterations, sha512(),
		    (int)sizeof(got), got))
		return -1;
	for (size_t i = 0; i < sizeof(got); i++)
		differ |= got[i] ^ want[i];
	return differ == 0;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *auth = event_data;
	const char *id = mosquitto_client_id(auth->client);
	const char *text;
	char hash[HASH_LEN] = "";
	struct lookup lookup = {auth->username, hash};

	(void)event;
	(void)userdata;
	if (auth->username == NULL || id == NULL)
		return MOSQ_ERR_PLUGIN_DEFER;   /* anonymous: allow_anonymous false refuses it */
	text = password_file();
	if (id_allowed(auth->username, id, text))
		return MOSQ_ERR_PLUGIN_DEFER;   /* the password file decides */
	if (text != NULL)
		each_user(text, user_hash, &lookup);
	if (text == NULL || (hash[0] != '\0' && password_matches(hash, auth->password) != 0)) {
		count(&connects, auth->username, id);
		report_if_due();
	}
	return MOSQ_ERR_AUTH;
}

/* ------------------------------------------------------------------ the plugin */

/* Mosquitto 2.0 calls this from its main loop, without filling in the event's times. */
static int on_tick(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	(void)userdata;
	report_if_due();
	return MOSQ_ERR_SUCCESS;
}


int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for (int i = 0; i < supported_version_count; i++)
		if (supported_versions[i] == 5)
			return 5;
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
			  struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	for (int i = 0; i < option_count; i++) {
		char *value = NULL;
		size_t size = NAME_LEN;

		if (strcmp(options[i].key, "base") == 0) {
			value = base;
		} else if (strcmp(options[i].key, "supervisor") == 0) {
			value = supervisor;
		} else if (strcmp(options[i].key, "home_assistant") == 0) {
			value = home_assistant;
		} else if (strcmp(options[i].key, "passwords") == 0) {
			value = passwords;
			size = PATH_LEN;
		}
		if (value == NULL || strlen(options[i].value) >= size) {
			mosquitto_log_printf(MOSQ_LOG_ERR, "kalki_denials: bad option %s", options[i].key);
			return MOSQ_ERR_INVAL;
		}
		strcpy(value, options[i].value);
	}
	snprintf(report_topic, sizeof(report_topic), "%s/bridge/denied", base);
	plugin_id = identifier;
	/* Registered before the password file's own check (Mosquitto loads plugins first, and a
	 * reload re-registers only its own), so asked first at every connection. */
	if (mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL)
	    || mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL)
	    || mosquitto_callback_register(plugin_id, MOSQ_EVT_TICK, on_tick, NULL, NULL))
		return MOSQ_ERR_UNKNOWN;
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_TICK, on_tick, NULL);
	free(password_text);
	password_text = NULL;
	return MOSQ_ERR_SUCCESS;
}
