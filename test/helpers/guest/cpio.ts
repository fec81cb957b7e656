/** The cpio "newc" writer now lives with the default image builder; re-exported for the test guest. */
export { type CpioEntry, cpioNewc } from '../../../src/image/cpio.js';
